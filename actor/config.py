"""Typed configuration of ``o2o-actor`` (Hydra structured config): a typo or a wrong type fails at start-up.

    o2o-actor task=pusher learner=tcp://10.0.0.5:5555 actor_id=robot-1
    o2o-actor task=pusher env=my_robot.envs:PusherRobot control_hz=20 actor_id=arm-1 learner=tcp://gpu:5555
    o2o-actor task=pointmaze-umaze learner=null policy.path=policy.onnx max_episodes=10   # dry run, no learner
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from omegaconf import MISSING

from o2o.robot.config import ArmConfig, RobotSettings
from o2o.transport.config import LinkConfig, SpoolConfig
from o2o.transport.security import require_keys_off_loopback


@dataclasses.dataclass
class PolicyConfig:
    path: str | None = None
    """ONNX file to act with until the learner publishes one (null = wait for the learner's policy)."""
    noise_scale: float = 1.0
    """Exploration: noise = noise_scale * N(0, I) on the policy's noise input. 1 samples the
    training policy, 0 acts deterministically."""
    swap: str = "step"
    """When a new policy is taken into use: "step" (between any two steps) or "episode"
    (only at episode boundaries, so an episode is acted by one policy)."""
    act_before_policy: bool = False
    """With no policy yet, act uniformly at random (transitions get policy_version -1)
    instead of waiting for the learner's first policy."""
    threads: int = 1
    """onnxruntime intra-op threads; 1 gives the lowest latency for small MLPs."""
    device: str = "cpu"
    """onnxruntime device: "cpu", "cuda" (needs onnxruntime-gpu) or "auto"."""


@dataclasses.dataclass
class ActorConfig:
    task: str = "pointmaze-umaze"
    """o2o task name (envs/tasks.py): the env, and what the learner and policy must match."""
    env: str | None = None
    """A user's env instead of the task's: import path "package.module:ClassName" of a
    gymnasium.Env subclass (e.g. a robot), built with env_kwargs."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the env (the task's gym.make or the env class)."""
    max_episode_steps: int = 0
    """Time limit added around the env (0 = the env's own; a robot's episode time limit)."""
    robot: RobotSettings = field(default_factory=RobotSettings)
    """A real arm instead of the task's env (``robot.type=so101_follower robot.port=/dev/ttyACM0 robot.id=arm1
    robot.cameras={...}``: robot/config.py); o2o's own settings around it are ``arm.*``."""
    arm: ArmConfig = field(default_factory=ArmConfig)
    """With a robot: action bounds and rate limit, reward (operator keys or a classifier), resets, takeover,
    and when to hold the arm (robot/config.py)."""
    learner: str | None = "tcp://127.0.0.1:5555"
    """The learner's ingest endpoint; null = dry run without a learner (needs policy.path
    or policy.act_before_policy; transitions are counted and discarded)."""
    keys: str | None = None
    """This actor's CURVE key folder (KEYS/actors/<actor_id>, made by `o2o-keys add` on the learner's
    machine): needed when the learner runs with keys. None = open link (loopback only)."""
    insecure: bool = False
    """Allow an open (unencrypted) link to a learner on another machine."""
    actor_id: str = MISSING
    """Unique, stable name of this actor (e.g. robot-1): sequence numbers and the spool are per actor_id."""
    seed: int = 0
    """Seed of the env resets and of the exploration noise (mixed with the actor's start seq)."""
    chunk_rows: int = 256
    """Transitions per chunk sent to the learner (a chunk is also sent at each episode end)."""
    control_hz: float = 0.0
    """Fixed control rate for robots: each step is padded to 1/control_hz s; late steps are
    counted as overruns. 0 = as fast as possible."""
    eval_every: int = 0
    """After every N training episodes, run eval_episodes deterministic episodes flagged eval (0 = never)."""
    eval_episodes: int = 1
    """Deterministic episodes in each evaluation (see eval_every)."""
    max_steps: int = 0
    """Stop after this many env steps (0 = no limit)."""
    max_episodes: int = 0
    """Stop after this many episodes, eval included (0 = no limit)."""
    log_every_s: float = 10.0
    """Progress line period (steps/s, episodes, returns, policy version, spool depth)."""
    stats_file: str | None = None
    """Write the final counters as JSON here at exit."""
    log_level: str = "INFO"
    """Python logging level of the actor's log (DEBUG, INFO, WARNING, ...)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The ONNX policy the actor acts with, and its exploration."""
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    """Where unacked transitions wait (memory, then disk)."""
    link: LinkConfig = field(default_factory=LinkConfig)
    """The connection to the learner: heartbeats, timeouts, flow control."""


CHOICES = {
    "policy.swap": ("step", "episode"),
    "policy.device": ("cpu", "cuda", "auto"),
    "spool.on_full": ("pause", "stop"),
    "link.on_learner_lost": ("continue", "stop"),
}


def validate(cfg: ActorConfig) -> None:
    """Checks Hydra's types cannot express; raises ValueError saying what to change."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    positive = {"chunk_rows": cfg.chunk_rows, "spool.memory_chunks": cfg.spool.memory_chunks,
                "link.max_in_flight": cfg.link.max_in_flight, "policy.threads": cfg.policy.threads,
                "link.heartbeat_s": cfg.link.heartbeat_s, "link.timeout_s": cfg.link.timeout_s}  # fmt: skip
    for key, value in positive.items():
        if not value > 0:
            raise ValueError(f"{key}={value}: must be > 0")
    if cfg.link.timeout_s <= cfg.link.heartbeat_s:
        raise ValueError(f"link.timeout_s={cfg.link.timeout_s} must exceed link.heartbeat_s={cfg.link.heartbeat_s}")
    if cfg.control_hz < 0 or cfg.policy.noise_scale < 0 or cfg.link.id_in_use_timeout_s < 0:
        raise ValueError("control_hz, policy.noise_scale and link.id_in_use_timeout_s must be >= 0")
    if not cfg.actor_id or "/" in cfg.actor_id or len(cfg.actor_id) > 128:
        raise ValueError(f"actor_id={cfg.actor_id!r}: give a non-empty name of <= 128 chars without '/'")
    if cfg.robot.type:
        if cfg.env is not None:
            raise ValueError(f"env={cfg.env} and robot.type={cfg.robot.type}: give one of them")
        cfg.arm.validate()
    if cfg.learner is None and cfg.policy.path is None and not cfg.policy.act_before_policy:
        raise ValueError("learner=null (dry run) needs policy.path=FILE.onnx or policy.act_before_policy=true")
    if cfg.learner is not None:
        require_keys_off_loopback(cfg.learner, cfg.keys, cfg.insecure, "this actor")
