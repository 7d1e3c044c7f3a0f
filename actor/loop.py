"""The control loop: act with the newest policy, step the env, hand transitions to a sink.

Reads top to bottom: (stop? / room? / hold / begin episode / swap policy) -> act ->
clip -> step -> record -> (flush chunk) -> (episode end) -> pace. It knows nothing
about sockets or robots: transitions go to a ``TransitionSink`` (whose status may
also hold the loop between episodes: the learner's flow control) and policies come
from a ``PolicySource`` (transport/seams.py); the env is any checked gymnasium env
(envs/robot.py), a MuJoCo task's or a robot's. Every wait (for spool room, for the
end of a hold, for a first policy) is one ``_wait`` on the sink's ``changed``
condition, so an ack, a release or a stop request ends it at once.

Chunks never span episodes and carry one policy version: a chunk is sent when
it holds ``chunk_rows`` rows, at each episode end, and before a policy swap.
An episode's id is the seq of its first chunk, so ids are unique across
actor restarts without any state of their own.

Cameras (an env whose observation is a Dict of a state vector and uint8 images, envs/obs_spec.py):
each observation is split and checked by ``ObsSpec.split`` (a wrong image stops the actor with
an ``ObservationError`` before anything of it is sent or acted on); rows carry the state vector
and each camera's frames travel once, in the chunk's segment layout (datasets/rows.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping

import gymnasium as gym
import numpy as np

from o2o.envs import hold_env
from o2o.envs.obs_spec import STATE_KEY, CameraSpec, ObservationError, ObsSpec
from o2o.robot.seams import EStopped, ResetInterrupted, RobotDisconnected
from o2o.transport.seams import PolicySource, SinkStatus, TransitionSink
from o2o.transport.wire import TransitionChunk

from .config import ActorConfig
from .onnx_policy import Exploration, OnnxPolicy

log = logging.getLogger("o2o.actor")

# A wait re-checks at least this often: only a wake-up that lands between its check and its
# sleep (a signal handler's) is missed, and then for no longer than this.
WAIT_RECHECK_S = 0.1


class NonFinite(FloatingPointError):
    """NaN/inf in an observation or an action: the loop stops instead of acting on it or sending it
    (the learner would reject the whole chunk)."""


@dataclasses.dataclass
class LoopStats:
    steps: int = 0
    episodes: int = 0
    eval_episodes: int = 0
    clipped_steps: int = 0  # steps whose policy action lay outside the action space
    overruns: int = 0  # steps longer than 1 / control_hz
    pauses: int = 0  # times the env was paused for a full spool
    interventions: int = 0  # steps whose executed action was the operator's (a robot's takeover)
    successes_total: int = 0  # training episodes that ended in success
    abandoned_episodes: int = 0  # episodes cut by an e-stop or a robot fault (the store closes them as abandoned)
    estops: int = 0
    watchdog_holds: int = 0  # times a robot was held because the learner was silent or far ahead
    holds: int = 0  # times the learner held this actor between episodes (flow control)
    held_s: float = 0.0
    chunks: int = 0
    rows: int = 0
    first_seq: int | None = None
    # [policy version, step, unix times of its first action, of its arrival and when its session was built]
    swaps: list = dataclasses.field(default_factory=list)
    returns: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=20))
    successes: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=20))
    eval_returns: list = dataclasses.field(default_factory=list)


class ChunkRows:
    """Pre-allocated rows of the chunk being filled, and each camera's frames.

    A chunk never spans episodes (the loop sends it at each episode end), so it is one segment of
    the frame layout (datasets/rows.py ``frame_layout``): n rows carry n + 1 frames, frame i the
    observation of row i and frame n the next observation of the last row. That frame is also the
    current observation's image (the one the policy acts on): a chunk sent mid-episode ends with
    it, and the next chunk starts with it again (the store keeps it once).
    """

    def __init__(self, rows: int, obs_dim: int, action_dim: int, cameras: tuple[CameraSpec, ...] = ()):
        self.obs = np.zeros((rows, obs_dim), np.float32)
        self.action = np.zeros((rows, action_dim), np.float32)
        self.next_obs = np.zeros((rows, obs_dim), np.float32)
        self.reward = np.zeros(rows, np.float32)
        self.terminated, self.truncated, self.success = (np.zeros(rows, np.uint8) for _ in range(3))
        self.intervention = np.zeros(rows, np.uint8)  # 1: the operator's action was executed (HIL-SERL)
        self._interventions = 0  # rows flagged in this chunk: the wire carries the column only if any
        self.frames = {camera.name: np.zeros((rows + 1, *camera.shape), np.uint8) for camera in cameras}
        self._frames = tuple(self.frames.items())
        self.capacity = rows
        self.n = 0

    def begin(self, images: dict[str, np.ndarray]) -> None:
        """An episode's first observation images (the chunk is empty: it starts with them)."""
        for name, frames in self._frames:
            frames[0] = images[name]

    def images(self) -> dict[str, np.ndarray]:
        """The current observation's images: views of the chunk's last frame (valid until the next add)."""
        n = self.n
        return {name: frames[n] for name, frames in self._frames}

    def add(self, obs, action, reward, next_obs, terminated, truncated, success, next_images=None,
            intervention: bool = False) -> bool:  # fmt: skip
        """Record one transition (``next_images``: its next observation's images, if cameras; ``intervention``:
        the action was the operator's); True when the chunk is full."""
        i = self.n
        self.obs[i], self.action[i], self.reward[i], self.next_obs[i] = obs, action, reward, next_obs
        self.terminated[i], self.truncated[i], self.success[i] = terminated, truncated, success
        self.intervention[i] = intervention
        self._interventions += intervention
        for name, frames in self._frames:
            frames[i + 1] = next_images[name]  # the one copy of each image
        self.n = i + 1
        return self.n == self.capacity

    def take(self) -> dict[str, np.ndarray]:
        """Copies of the filled rows and frames (the sink keeps them; these buffers are reused)."""
        n, self.n = self.n, 0
        names = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "success")
        taken = {name: getattr(self, name)[:n].copy() for name in names}
        if self._interventions:
            taken["intervention"] = self.intervention[:n].copy()
            self._interventions = 0
        if self._frames:
            taken["frames"] = {name: frames[: n + 1].copy() for name, frames in self._frames}
            for _, frames in self._frames:
                frames[0] = frames[n]  # mid-episode, the next chunk starts at the current observation
        return taken


class Actor:
    """Runs ``env`` with policies from ``policies``, sending chunks to ``sink``; ``run`` may be
    called again to continue where it stopped (same episode, same counters)."""

    def __init__(self, env: gym.Env, sink: TransitionSink, policies: PolicySource, cfg: ActorConfig):
        self.env, self.sink, self.policies, self.cfg = env, sink, policies, cfg
        space = env.action_space
        self.low, self.high = space.low.astype(np.float32), space.high.astype(np.float32)
        # A flat Box is a state-only env (today's path: its observation is used as it comes);
        # a Dict with cameras is split and checked at every step.
        self.spec = ObsSpec.from_space(env.observation_space)
        self.cameras = self.spec.has_images
        obs_dim, action_dim = self.spec.state_dim, space.shape[0]
        seeds = np.random.SeedSequence([cfg.seed, sink.status().next_seq])  # a restarted actor draws new noise
        self.explore = Exploration(action_dim, cfg.policy.noise_scale, seeds.spawn(1)[0])
        self.reset_rng = np.random.default_rng(seeds.spawn(1)[0])
        self.rows = ChunkRows(cfg.chunk_rows, obs_dim, action_dim, self.spec.cameras)
        self._may_clip = True
        self.period = 1.0 / cfg.control_hz if cfg.control_hz > 0 else 0.0
        self.stats = LoopStats()
        self.policy: OnnxPolicy | None = None
        self.obs: np.ndarray | None = None  # the current observation's state (its images: self.rows.images())
        self.stop_requested = False
        self.paused = False  # waiting for spool room (mid-episode)
        self.holding = False  # held by the learner (between episodes)
        self.watchdog = None  # a robot's robot.safety.LinkWatchdog: hold the arm when the learner is gone or far ahead
        self.guarded: str | None = None  # why the watchdog holds the arm now
        self.finished = False
        self._rate = (time.monotonic(), 0)  # (time, steps) of the last status(): its steps/s
        self._train_since_eval = self._eval_left = 0

    @property
    def version(self) -> int:
        return self.policy.version if self.policy is not None else -1

    def request_stop(self) -> None:
        """Ask ``run`` to return after the current step, or at once from a wait (safe from a signal
        handler: the condition's lock is reentrant)."""
        self.stop_requested = True
        interrupt = getattr(self.env.unwrapped, "request_stop", None)  # a robot waiting for its operator
        if callable(interrupt):
            interrupt()
        with self.sink.changed:
            self.sink.changed.notify_all()

    def run(self, max_steps: int = 0, max_episodes: int = 0) -> str:
        """Step until ``max_steps`` more steps / ``max_episodes`` more episodes (0 = no limit) or a
        stop; returns why it stopped. The open chunk is sent before returning."""
        end_steps = self.stats.steps + max_steps if max_steps else None
        end_episodes = self.stats.episodes + max_episodes if max_episodes else None
        self._tick = self._last_log = time.perf_counter()
        self._log_steps = self.stats.steps
        self.finished = False
        while True:
            try:
                reason = self._before_step(end_steps, end_episodes)  # a reset's observation may be NonFinite
                if reason is not None:
                    break
                self._step()
            except NonFinite as err:
                reason = str(err)
                break
            except ResetInterrupted:  # a stop request ended the wait for the operator: the next check stops
                continue
            except EStopped as err:  # the arm holds; the next episode starts once the operator releases it
                self._abandon_episode(f"e-stop: {err}")
                self.stats.estops += 1
                continue
            except RobotDisconnected as err:
                self._abandon_episode(f"the robot stopped answering: {err}")
                reason = f"robot disconnected mid-episode ({err}): check its cable and power, then restart the actor"
                break
            except ObservationError:
                self._flush()  # the rows before it are whole transitions; the bad observation is in none of them
                raise
            if time.perf_counter() - self._last_log >= self.cfg.log_every_s:
                self._log_progress()
        self._flush()
        self.finished = True
        return reason

    def _abandon_episode(self, why: str) -> None:
        """Send the episode's whole transitions and start a new episode next: the store closes this one as
        abandoned (no MC return) when the next one's rows arrive."""
        log.warning("episode cut at step %d: %s", self.ep_step, why)
        self._flush()
        self.obs = None
        self.stats.abandoned_episodes += 1
    def _before_step(self, end_steps: int | None, end_episodes: int | None) -> str | None:
        """Whatever must happen between two steps; None when the next step may go, else why to stop."""
        if self.stop_requested:
            return "stop requested"
        if (end_steps and self.stats.steps >= end_steps) or (end_episodes and self.stats.episodes >= end_episodes):
            return "done"
        status = self.sink.status()
        if status.stop is not None:
            return status.stop
        if self.watchdog is not None and self._link_reason() is not None and (why := self._guard()) is not None:
            return why
        # Room is checked as a chunk starts: once begun, a chunk is always taken (never dropped).
        if self.rows.n == 0 and not status.room and (why := self._out_of_room()) is not None:
            return why
        if self.obs is None:
            # The learner holds actors between episodes only: an episode is never cut by a hold.
            if status.held and (why := self._held()) is not None:
                return why
            self._begin_episode()
        elif self.cfg.policy.swap == "step":
            self._maybe_swap()
        if self.policy is None and not self.cfg.policy.act_before_policy:
            return self._wait_for_policy()
        return None

    def _step(self) -> None:
        evaluating = self._eval_left > 0
        if self.policy is None:
            action = self.reset_rng.uniform(self.low, self.high).astype(np.float32)
        else:
            images = self.rows.images() if self.cameras else None
            action = self.policy.act(self.obs, self.explore.draw(0.0 if evaluating else None), images)
        clipped = np.minimum(np.maximum(action, self.low), self.high)  # a fresh array: the env may keep it
        if not math.isfinite(np.add.reduce(clipped)):  # NaN survives clipping: never send it to a robot
            raise NonFinite(f"policy version {self.version} gave the non-finite action {action} "
                            f"for the observation {self.obs}")  # fmt: skip
        if self._may_clip and not np.array_equal(clipped, action):
            self.stats.clipped_steps += 1
        next_obs, reward, terminated, truncated, info = self.env.step(clipped)
        # A robot may execute another action than asked (its safety filter, the operator's takeover): the row
        # holds what the arm did (robot/robot_env.py).
        executed = info.get("action", clipped)
        intervention = bool(info.get("intervention", False))
        self.stats.interventions += intervention
        next_images = None
        if self.cameras:
            next_obs, next_images = self._split(next_obs, self.ep_step + 1)
        if not math.isfinite(np.add.reduce(next_obs)) or not math.isfinite(reward):
            raise NonFinite(f"the env returned a non-finite observation {next_obs} or reward {reward} at "
                            f"step {self.ep_step}: that transition is not sent (a sensor fault?)")  # fmt: skip
        self.stats.steps += 1
        self.ep_return += reward
        self.ep_step += 1
        full = self.rows.add(self.obs, executed, reward, next_obs, terminated, truncated, info.get("success", False),
                             next_images, intervention)  # fmt: skip
        if terminated or truncated:
            self._end_episode(evaluating, bool(info.get("success", False)))
        else:
            self.obs = next_obs
            if full:
                self._flush()
        self._pace()

    def _split(self, obs, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(state, images) of observation ``index`` of the episode (0 = the reset's) of an env with cameras;
        ObservationError if it does not match the env's declared space (NonFinite for a NaN/inf state, as
        without cameras)."""
        try:
            return self.spec.split(obs)
        except ObservationError as err:
            state = obs.get(STATE_KEY) if isinstance(obs, Mapping) else None
            if np.shape(state) == (self.spec.state_dim,) and not np.isfinite(np.asarray(state, np.float64)).all():
                raise NonFinite(f"the env returned a non-finite state {state} as observation {index} of the "
                                "episode: that transition is not sent (a sensor fault?)") from None  # fmt: skip
            raise ObservationError(f"the env's observation {index} of the episode (0 = the reset's) does not match "
                                   f"its declared space: {err}") from None  # fmt: skip

    def _flush(self) -> None:
        if self.rows.n == 0:
            return
        seq = self.sink.status().next_seq
        if self.episode_id is None:
            self.episode_id = seq
        if self.stats.first_seq is None:
            self.stats.first_seq = seq
        n = self.rows.n
        chunk = TransitionChunk(actor_id=self.cfg.actor_id, seq=seq, policy_version=self.version,
                                episode_id=self.episode_id, step=self.chunk_step, eval=self._eval_left > 0,
                                **self.rows.take())  # fmt: skip
        self.sink.add(chunk)
        self.stats.chunks += 1
        self.stats.rows += n
        self.chunk_step = self.ep_step

    def _begin_episode(self) -> None:
        self._maybe_swap()  # policy.swap=episode swaps only here
        self.ep_step = self.chunk_step = 0
        obs, _ = self.env.reset(seed=int(self.reset_rng.integers(2**31)))
        if self.cameras:
            obs, images = self._split(obs, 0)
            self.rows.begin(images)
        self.obs = obs
        self.episode_id = None  # set by the episode's first chunk
        self.ep_return = 0.0

    def _end_episode(self, evaluating: bool, success: bool) -> None:
        self._flush()
        self.obs = None
        self.stats.episodes += 1
        if evaluating:
            self.stats.eval_episodes += 1
            self.stats.eval_returns.append(self.ep_return)
            self._eval_left -= 1
            log.info("eval episode %d: return %.2f, success %s (policy version %d)",
                     self.episode_id, self.ep_return, success, self.version)  # fmt: skip
            return
        self.stats.returns.append(self.ep_return)
        self.stats.successes.append(success)
        self.stats.successes_total += success
        self._train_since_eval += 1
        if self.cfg.eval_every and self._train_since_eval >= self.cfg.eval_every and self.policy is not None:
            self._train_since_eval, self._eval_left = 0, self.cfg.eval_episodes

    def _maybe_swap(self) -> None:
        new = self.policies.latest()
        if new is not None and new is not self.policy:
            self._flush()  # a chunk carries one policy version
            self.policy = new
            # A policy acting inside the env's bounds needs no per-step comparison to count clips.
            self._may_clip = bool((new.action_low < self.low).any() or (new.action_high > self.high).any())
            self.stats.swaps.append([new.version, self.stats.steps, time.time(), new.received_at, new.built_at])
            log.info("acting with policy version %d from step %d", new.version, self.stats.steps)

    def _wait(self, ready: Callable[[SinkStatus], bool]) -> str | None:
        """Block until ``ready(sink status)``: None, or why to stop instead (the sink's reason first).

        The checks run holding ``changed``, and whoever changes what they read notifies it after
        the change (the link after each turn of its thread, the policy builder after each
        policy, ``request_stop``), so no wake-up falls between a check and the wait."""
        changed = self.sink.changed
        with changed:
            while True:
                status = self.sink.status()
                if status.stop is not None:
                    return status.stop
                if self.stop_requested:
                    return "stop requested"
                if ready(status):
                    break
                changed.wait(WAIT_RECHECK_S)
        self._tick = time.perf_counter()  # pace from here: a wait is no overrun
        return None

    def _wait_for_policy(self) -> str | None:
        log.info("waiting for the learner's first policy (or set policy.path / policy.act_before_policy=true)")
        why = self._wait(lambda _: self.policies.latest() is not None)
        if why is None:
            self._maybe_swap()
        return why

    def _held(self) -> str | None:
        """The learner is ahead of its updates (samples-per-insert): wait between episodes."""
        log.info("the learner holds this actor between episodes (it is ahead of the learner's updates)")
        self.stats.holds += 1
        self.holding = True
        start = time.perf_counter()
        why = self._wait(lambda status: not status.held)
        self.holding = False
        self.stats.held_s += time.perf_counter() - start
        return why

    def _link_reason(self) -> str | None:
        """Why a robot must hold now (the learner silent too long, the policy too far behind), else None."""
        link = self.sink.summary()
        newest, built = link.get("learner_policy_version", -1), self.policies.latest()  # built: acted with next
        lag = newest - built.version if built is not None and newest >= 0 else None
        return self.watchdog.reason(link.get("learner_silent_s"), lag)

    def _guard(self) -> str | None:
        """Hold the arm (mid-episode too) until the watchdog's reason clears; None, or why to stop instead."""
        self.guarded = self._link_reason()
        log.warning("holding the arm: %s", self.guarded)
        self.stats.watchdog_holds += 1
        hold_env(self.env)
        start = time.perf_counter()

        def cleared(_status) -> bool:
            self.guarded = self._link_reason()  # what o2o-status shows while it holds
            return self.guarded is None

        why = self._wait(cleared)
        self.guarded = None
        if why is None:
            log.warning("the learner is back: acting again after a %.1f s hold", time.perf_counter() - start)
        return why

    def _out_of_room(self) -> str | None:
        """The spool is full: stop (``spool.on_full=stop``) or pause mid-episode until the learner acks."""
        depth = self.sink.summary().get("spool_depth")
        if self.cfg.spool.on_full == "stop":
            log.error("spool full (%s unacked chunks): stopping safely (spool.on_full=stop). "
                      "Is the learner up and acking? Raise spool.max_disk_mb to hold more.", depth)  # fmt: skip
            return "spool full"
        log.warning("spool full (%s unacked chunks): env paused until the learner acks (spool.on_full=pause)", depth)
        self.stats.pauses += 1
        self.paused = True
        hold_env(self.env)  # an env that can (a robot's envs.HoldableEnv) keeps still meanwhile
        start = time.perf_counter()
        why = self._wait(lambda status: status.room)
        self.paused = False
        if why is None:
            log.warning("spool has room again: resuming after a %.1f s pause", time.perf_counter() - start)
        return why

    def _pace(self) -> None:
        if not self.period:
            return
        deadline = self._tick + self.period
        now = time.perf_counter()
        if now > deadline:
            self.stats.overruns += 1
            self._tick = now  # restart the schedule: no burst of short steps to catch up
        else:
            time.sleep(deadline - now)
            self._tick = deadline

    def _log_progress(self) -> None:
        now = time.perf_counter()
        rate = (self.stats.steps - self._log_steps) / (now - self._last_log)
        self._last_log, self._log_steps = now, self.stats.steps
        s, link = self.stats, self.sink.summary()
        ret = f"{np.mean(s.returns):.2f}" if s.returns else "-"
        succ = f"{np.mean(s.successes):.0%}" if s.successes else "-"
        log.info("steps %d (%.0f/s) | episodes %d (eval %d) | return %s success %s (last %d) | policy v%d | "
                 "spool %s | clipped %d overruns %d%s", s.steps, rate, s.episodes, s.eval_episodes, ret, succ,
                 len(s.returns), self.version, link.get("spool_depth"), s.clipped_steps, s.overruns,
                 " | learner LOST" if link.get("learner_lost") else "")  # fmt: skip

    def status(self) -> dict:
        """What this actor is doing, for the learner's fleet view (``o2o-status``); called from the link's thread."""
        env = self.env.unwrapped
        waiting = getattr(env, "waiting_for", None)
        if self.finished:
            state = "stopped"
        elif getattr(env, "estopped", False):
            state = "e_stopped"
        elif waiting:
            state = "waiting_for_reset"
        elif self.paused:
            state = "paused"
        elif self.holding or self.guarded:
            state, waiting = "held", self.guarded
        elif self.policy is None and not self.cfg.policy.act_before_policy:
            state = "waiting_for_policy"
        else:
            state = "acting"
        now, steps = time.monotonic(), self.stats.steps
        last_time, last_steps = self._rate
        self._rate = (now, steps)
        return {"state": state, "waiting_for": waiting, "steps": steps,
                "steps_per_s": (steps - last_steps) / (now - last_time) if now > last_time else 0.0,
                "episodes": self.stats.episodes, "successes": self.stats.successes_total,
                "interventions": self.stats.interventions, "policy_version": self.version,
                "spool_depth": int(self.sink.summary().get("spool_depth") or 0)}  # fmt: skip

    def summary(self) -> dict:
        s = self.stats
        return {**{k: v for k, v in dataclasses.asdict(s).items() if k not in ("returns", "successes")},
                "policy_version": self.version, "mean_return": float(np.mean(s.returns)) if s.returns else None}  # fmt: skip
