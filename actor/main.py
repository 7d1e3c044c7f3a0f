"""`o2o-actor`: run one actor against a learner (Hydra entry point; schema in actor/config.py).

    o2o-actor task=pusher learner=tcp://10.0.0.5:5555 actor_id=robot-1
    o2o-actor task=pusher env=my_robot.envs:Arm control_hz=20 actor_id=arm-1 learner=tcp://gpu-box:5555
    o2o-actor task=pointmaze-umaze learner=null policy.path=policy.onnx max_episodes=5 actor_id=dry

Exit status: 0 done (max_steps/max_episodes or SIGTERM/SIGINT, after waiting up to link.drain_s
for acks), 2 bad configuration (or an env observation that does not match its declared space, e.g. a camera
image of another size: nothing of it is sent; a classifier for other inputs), 3 stopped safely (learner lost or
refused us, spool full or its disk failing; a robot: a NaN action, a pulled cable, a home out of reach, no terminal
for the operator's reset key: see the log line; the arm is left held and disconnected), 128 + signal: a second
SIGTERM/SIGINT cut that wait short (the unacked chunks stay in the spool for the next run).

    o2o-actor task=arm-reach robot.type=so101_follower robot.port=/dev/ttyACM0 'arm.limits={...}' actor_id=arm-1
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from o2o.envs import make_actor_env
from o2o.envs.obs_spec import ObsSpec
from o2o.robot.assemble import make_arm_env
from o2o.robot.operator import OperatorUnavailable
from o2o.robot.reset import ResetFailed
from o2o.robot.safety import LinkWatchdog
from o2o.transport.limits import ChunkSpec
from o2o.transport.link import Link
from o2o.transport.seams import PolicySource, TransitionSink
from o2o.transport.security import ActorKeys
from o2o.transport.spool import Spool, SpoolError

from .config import ActorConfig, validate
from .loop import Actor
from .onnx_policy import OnnxPolicy, PolicyExpectation, PolicyMismatch
from .seams import FixedPolicySource, MemorySink, PolicyBuilder

log = logging.getLogger("o2o.actor")

ConfigStore.instance().store(name="actor_schema", node=ActorConfig)

EXIT_CONFIG = 2
EXIT_STOPPED = 3


def assemble(cfg: ActorConfig) -> tuple[gym.Env, TransitionSink, PolicySource, Link | None]:
    """The env, the sink and the policy source for ``cfg`` (a started ``Link``, or a dry run's)."""
    validate(cfg)
    # A task's MuJoCo env, a user's env class or a real arm: the same loop drives each (envs/robot.py checks it).
    if cfg.robot.type:
        env = make_arm_env(cfg.task, cfg.robot, cfg.arm, cfg.max_episode_steps)
    else:
        env = make_actor_env(cfg.task, cfg.env, dict(cfg.env_kwargs), cfg.max_episode_steps)
    try:  # a refused configuration never leaves a robot's connection open
        spec = ObsSpec.from_space(env.observation_space)  # the state vector and the cameras, if any
        obs_dim, action_dim = spec.state_dim, env.action_space.shape[0]
        max_rows = ChunkSpec.for_obs(spec, action_dim).max_rows  # what the learner accepts
        if cfg.chunk_rows > max_rows:
            why = f" with these cameras ({spec.image_bytes} image bytes per observation)" if spec.has_images else ""
            raise ValueError(f"chunk_rows={cfg.chunk_rows}: the learner takes chunks of at most {max_rows} rows{why}: "
                             f"set chunk_rows<={max_rows}")  # fmt: skip
        cameras = spec.to_dict()["cameras"]  # {name: [H, W, C]}; {} for a state task
        expect = PolicyExpectation(cfg.task, obs_dim, action_dim, {c.name: c.shape for c in spec.cameras})

        def build_policy(onnx: bytes | Path, version: int | None) -> OnnxPolicy:
            policy = OnnxPolicy(onnx, expect, version=version, threads=cfg.policy.threads, device=cfg.policy.device)
            if not (np.allclose(policy.action_low, env.action_space.low) and np.allclose(policy.action_high, env.action_space.high)):
                log.warning("policy version %d acts in [%s, %s], the env in [%s, %s]: actions are clipped to the env's",
                            policy.version, policy.action_low, policy.action_high, env.action_space.low, env.action_space.high)  # fmt: skip
            return policy

        initial = build_policy(Path(cfg.policy.path), None) if cfg.policy.path is not None else None
        if cfg.learner is None:
            return env, MemorySink(), FixedPolicySource(initial), None
        folder = Path(cfg.spool.dir) / cfg.actor_id if cfg.spool.dir else None
        meta = {"actor_id": cfg.actor_id, "task": cfg.task, "obs_dim": obs_dim, "action_dim": action_dim}
        if cameras:  # a state task's spool folder keeps today's meta (its unacked chunks still resend)
            meta["cameras"] = cameras
        spool = Spool(cfg.spool.memory_chunks, folder, int(cfg.spool.max_disk_mb * 2**20),
                      int(cfg.spool.segment_mb * 2**20), meta=meta)  # fmt: skip
    except BaseException:
        env.close()
        raise
    changed = threading.Condition()  # the loop's one wake-up: notified by the link and by each built policy
    builder = PolicyBuilder(build_policy, initial, changed)
    keys = ActorKeys(cfg.keys, cfg.actor_id) if cfg.keys else None
    link = Link(cfg.learner, cfg.actor_id, cfg.task, obs_dim, action_dim, spool, builder, cfg.link, changed, keys,
                cameras=cameras)  # fmt: skip
    return env, link, link, link.start()


def wait_for_learner(link: Link, cfg: ActorConfig, stop: threading.Event | None = None) -> bool:
    """Block until the learner welcomes this actor (True) or ``stop`` is set (False); ConnectionError
    if the learner refuses this actor or ``link.connect_timeout_s`` passes."""
    log.info("actor %s: connecting to learner %s (task %s)", cfg.actor_id, cfg.learner, cfg.task)
    start = last_line = time.monotonic()
    while not link.wait_welcome(0.1):
        now = time.monotonic()
        if link.fatal or (stop is not None and stop.is_set()):
            break
        if cfg.link.connect_timeout_s and now - start > cfg.link.connect_timeout_s:
            raise ConnectionError(f"learner {cfg.learner} did not answer within {cfg.link.connect_timeout_s} s: "
                                  "is it running, and is the address reachable from here?")  # fmt: skip
        if now - last_line > 5.0:
            last_line = now
            log.info("still waiting for learner %s (%.0f s) ...", cfg.learner, now - start)
    if link.fatal:
        raise ConnectionError(link.fatal)
    return link.wait_welcome(0)


def run_actor(cfg: ActorConfig) -> int:
    """Act until done or stopped (SIGTERM/SIGINT stop cleanly at any point); returns the exit status."""
    env, sink, policies, link = assemble(cfg)
    stop = threading.Event()
    actor: Actor | None = None
    signals: list[int] = []

    def request_stop(signum: int, _frame) -> None:
        signals.append(signum)
        if len(signals) > 1 and link is not None:
            # A second signal: do not wait out link.drain_s for acks (a learner that is gone);
            # the unacked chunks stay in the spool for the next run, the env is still closed.
            link.stop_draining()
            os.write(2, f"o2o-actor: second signal ({signal.Signals(signum).name}): not waiting for acks, the "
                        "unacked chunks stay in the spool\n".encode())  # fmt: skip
        stop.set()
        if actor is not None:
            actor.request_stop()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        if link is None or wait_for_learner(link, cfg, stop):
            actor = Actor(env, sink, policies, cfg)
            if cfg.robot.type:  # hold the arm while the learner is gone or its policy far behind
                actor.watchdog = LinkWatchdog(cfg.arm.learner_silent_s, cfg.arm.max_policy_lag)
            if link is not None:
                link.status_source = actor.status  # the learner's fleet view (o2o-status)
            if stop.is_set():
                actor.request_stop()
            reason = actor.run(cfg.max_steps, cfg.max_episodes)
            stopped_safely = reason not in ("done", "stop requested")
            (log.error if stopped_safely else log.info)("actor %s stopped: %s", cfg.actor_id, reason)
            status = EXIT_STOPPED if stopped_safely else 0
    except (ConnectionError, ResetFailed, OperatorUnavailable) as err:  # the learner, or a robot that cannot start
        log.error("%s", err)  # an episode (home out of reach, no operator to press the reset key)
        status = EXIT_STOPPED
    finally:
        try:
            if link is not None:
                link.close(0.0 if len(signals) > 1 else None)
        finally:  # whatever the link or spool did: a robot env is never left open
            env.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if cfg.stats_file:
            stats = {"actor": actor.summary() if actor else None, "link": link.summary() if link else None}
            Path(cfg.stats_file).write_text(json.dumps(stats))
    return 128 + signals[1] if len(signals) > 1 else status


@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="actor")
def _hydra_main(dict_cfg: DictConfig) -> None:
    try:
        cfg: ActorConfig = OmegaConf.to_object(dict_cfg)
    except MissingMandatoryValue as err:
        print(f"o2o-actor: error: {err.full_key} is required, e.g. {err.full_key}=robot-1", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    logging.getLogger().setLevel(cfg.log_level)
    try:
        status = run_actor(cfg)
    except (ValueError, KeyError, FileNotFoundError, PolicyMismatch, SpoolError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"o2o-actor: error: {message}", file=sys.stderr)
        status = EXIT_CONFIG
    sys.exit(status)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
