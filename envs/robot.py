"""What an actor steps: a task's env, or a user's env class (a robot, a custom sim) by import path.

The actor's loop drives both alike; all it relies on is checked here, once, at start-up:
a 1-D Box action space with finite bounds (actions are clipped to it) and a flat 1-D Box
observation (a Dict observation is flattened, ``envs.observation``). A user's env is any
``gymnasium.Env`` subclass, named ``package.module:ClassName`` and built with keyword arguments:

    class Arm(gymnasium.Env):            # my_robot/envs.py
        def __init__(self, port: str): ...
        def hold(self) -> None: ...      # optional: keep still while the actor cannot step

    env = make_actor_env("pusher", "my_robot.envs:Arm", {"port": "/dev/ttyUSB0"})

The env gives ``info["success"]`` when it knows (task envs always do); ``close()`` is always
called when the actor exits, so a robot can park and release its hardware there.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

from .obs_spec import ObsSpec, camera_parts
from .observation import FlattenDictObservation
from .tasks import get_task, make_env


@runtime_checkable
class HoldableEnv(Protocol):
    """An env that can keep still on request (optional: envs without ``hold`` are never asked)."""

    def hold(self) -> None:
        """Keep still (hold position, brakes on) until the next ``step``/``reset``: the actor
        pauses mid-episode, e.g. while its spool is full (``spool.on_full=pause``)."""


def hold_env(env: gym.Env) -> bool:
    """Ask ``env`` (its unwrapped base: wrappers do not forward ``hold``) to keep still; True if it can."""
    base = env.unwrapped
    if isinstance(base, HoldableEnv) and callable(base.hold):  # the Protocol checks only that it exists
        base.hold()
        return True
    return False


def load_env_class(path: str) -> type[gym.Env]:
    """The class named by ``package.module:ClassName`` (a gymnasium.Env subclass)."""
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"env={path!r}: expected an import path 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"env={path!r}: cannot import it ({err}); is its package installed / on PYTHONPATH?") from None
    if not (isinstance(cls, type) and issubclass(cls, gym.Env)):
        raise ValueError(f"env={path!r} is {cls!r}, not a gymnasium.Env subclass")
    return cls


def check_actor_env(env: gym.Env) -> gym.Env:
    """``env`` if its spaces fit an actor, else ValueError: a Dict with camera images stays a Dict (the actor
    splits it by ``ObsSpec``; an image is never flattened into floats), another Dict is flattened."""
    if camera_parts(env.observation_space):
        ObsSpec.from_space(env.observation_space)  # a state vector and uint8 images, or an ObservationError
    else:
        if isinstance(env.observation_space, gym.spaces.Dict):
            env = FlattenDictObservation(env)
        obs_space = env.observation_space
        if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
            raise ValueError(f"the env's observation space is {obs_space}: o2o actors need a 1-D Box (or a Dict of them)")
    act_space = env.action_space
    if not (isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1):
        raise ValueError(f"the env's action space is {act_space}: o2o actors need a 1-D Box")
    if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
        raise ValueError(f"the env's action space {act_space} is unbounded: actions could not be clipped")
    return env


def make_actor_env(task: str, env: str | None = None, env_kwargs: dict[str, Any] | None = None,
                   max_episode_steps: int = 0) -> gym.Env:  # fmt: skip
    """The env an actor steps: ``task``'s (``make_env``), or the class at import path ``env``,
    built with ``env_kwargs``; a ``max_episode_steps`` time limit around it (0 = the env's own);
    checked by ``check_actor_env``. The env is closed again if a check fails."""
    spec = get_task(task)  # a user's env too names a task (what the learner and policy must match)
    kwargs = dict(env_kwargs or {})
    made = make_env(spec, **kwargs) if env is None else load_env_class(env)(**kwargs)
    try:
        if max_episode_steps:
            made = gym.wrappers.TimeLimit(made, max_episode_steps)
        return check_actor_env(made)
    except BaseException:
        made.close()  # a robot's connection is never left open by a refused configuration
        raise
