"""A MuJoCo camera for the Fetch tasks: an offscreen-rendered RGB image plus the gripper's state.

The Fetch arm's table is seen by a fixed free camera (``FETCH_VIEW``) in front of the table, above and a
little to the side, looking back at the robot: the puck and the goal (the red ``target0`` site) are in
the image, and only there; the state vector is the gripper's own (position, finger widths and their
velocities), what a real arm's encoders give. The view was picked by counting, on 30 scripted episodes,
the frames in which the puck or the goal is hidden (behind the gripper, out of frame): about 5 % for the
puck, 2 % for the goal; cameras looking down from above or from behind the robot lose them far more often.

Offscreen rendering needs an OpenGL backend: EGL (``libegl1``) or OSMesa (``libosmesa6``, pure CPU).
``gl_backend`` picks one once per process: ``MUJOCO_GL`` if the user set it, else the first of egl, osmesa
that starts; where none does, a ``GLUnavailable`` says what to install. mujoco's own ``mujoco.Renderer``
fixes its backend when mujoco is imported (from ``MUJOCO_GL`` at that moment), so ``OffscreenCamera``
makes its GL context itself (the steps of ``mujoco.Renderer``, mujoco/rendering/classic/renderer.py).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import weakref
from collections.abc import Iterable

import gymnasium as gym
import mujoco
import numpy as np

from .obs_spec import STATE_KEY

CAMERA = "front"
IMAGE_SIZE = 84  # DrQ's size (Yarats et al. 2021, section 4); 84 px shows the 5 cm puck ~9 px wide
FETCH_VIEW = {"lookat": (1.32, 0.75, 0.42), "distance": 0.7, "azimuth": 160.0, "elevation": -40.0}
"""A free camera (mujoco's mjvCamera): the table's centre (Fetch's table0 body is at x 1.3, y 0.75, its top
at z 0.4) seen from 0.7 m away, 40 degrees above the table, from the side opposite the robot."""

# Fetch's observation vector (gymnasium_robotics/envs/fetch/fetch_env.py, BaseFetchEnv._get_obs):
# grip_pos 0:3, object_pos 3:6, object_rel_pos 6:9, gripper_state (finger widths) 9:11, object_rot 11:14,
# object_velp 14:17, object_velr 17:20, grip_velp 20:23, gripper_vel (finger velocities) 23:25.
GRIPPER_STATE = np.r_[0:3, 9:11, 20:23, 23:25]
"""The gripper's part of it: position, finger widths, linear velocity, finger velocities (10 values)."""

GL_BACKENDS = ("egl", "osmesa")  # tried in this order when MUJOCO_GL is not set
USER_BACKENDS = (*GL_BACKENDS, "glfw")  # glfw needs a display: accepted only when the user asks for it
INSTALL_HINT = (
    "MuJoCo cameras need offscreen OpenGL: install EGL (Debian/Ubuntu: `apt-get install libegl1`, then "
    "MUJOCO_GL=egl) or OSMesa (`apt-get install libosmesa6`, then MUJOCO_GL=osmesa; CPU only)"
)


class GLUnavailable(RuntimeError):
    """No OpenGL backend can render offscreen here; the message says what to install."""


_chosen: dict[str, str] = {}  # MUJOCO_GL as found -> the backend this process renders with


def gl_backend() -> str:
    """The OpenGL backend of this process's MuJoCo cameras ("egl", "osmesa" or the user's "glfw"), checked
    to start; a ``GLUnavailable`` saying what to install where none does."""
    wanted = os.environ.get("MUJOCO_GL", "").strip().lower()
    if wanted not in _chosen:
        _chosen[wanted] = _choose(wanted)
    return _chosen[wanted]


def _choose(wanted: str) -> str:
    if wanted:  # the user's choice, and only it
        if wanted not in USER_BACKENDS:
            raise GLUnavailable(f"MUJOCO_GL={wanted!r}: o2o's cameras render with {' or '.join(USER_BACKENDS)}. "
                                f"{INSTALL_HINT}")  # fmt: skip
        _start_here(wanted)
        return wanted
    bound = os.environ.get("PYOPENGL_PLATFORM", "").strip().lower()
    if bound:  # PyOpenGL binds to one platform per process: only that one can still start here
        if bound not in GL_BACKENDS:
            raise GLUnavailable(f"PYOPENGL_PLATFORM={bound!r} is set, so neither EGL nor OSMesa can start in this "
                                f"process; unset it or set it to egl or osmesa. {INSTALL_HINT}")  # fmt: skip
        _start_here(bound)
        return bound
    errors = {}
    for name in GL_BACKENDS:
        # Each is tried in a child process: a failed EGL start here would bind PyOpenGL to EGL for good,
        # leaving OSMesa unusable in this process.
        errors[name] = _probe(name)
        if errors[name] is None:
            os.environ["MUJOCO_GL"] = name  # this process's later envs and its child processes skip the probe
            _chosen[name] = name
            return name
    tried = "; ".join(f"{name}: {error}" for name, error in errors.items())
    raise GLUnavailable(f"no OpenGL backend starts ({tried}). {INSTALL_HINT}")


_PROBE = """import importlib, sys, mujoco
context = importlib.import_module("mujoco." + sys.argv[1]).GLContext(8, 8)
context.make_current()
mujoco.MjrContext(mujoco.MjModel.from_xml_string("<mujoco/>"), mujoco.mjtFontScale.mjFONTSCALE_100).free()
context.free()
"""


def _probe(name: str) -> str | None:
    """None if backend ``name`` makes a MuJoCo GL context in a fresh process, else its error's last line."""
    env = {**os.environ, "MUJOCO_GL": name, "PYOPENGL_PLATFORM": name}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, name], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timed out starting"
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def gl_context_class(backend: str) -> type:
    """mujoco's GLContext class of ``backend`` (importing it binds PyOpenGL to that platform)."""
    try:
        return importlib.import_module(f"mujoco.{backend}").GLContext
    except Exception as err:  # ImportError, or a library that loads but fails (e.g. no EGL device)
        raise GLUnavailable(f"MuJoCo's {backend} backend cannot load ({err}). {INSTALL_HINT}") from err


def _start_here(backend: str) -> None:
    """Make and free a tiny GL context with ``backend`` in this process, or a GLUnavailable naming it."""
    context_class = gl_context_class(backend)
    try:
        context = context_class(8, 8)
        context.make_current()
        context.free()
    except Exception as err:
        raise GLUnavailable(f"MUJOCO_GL={backend}: no GL context ({err}). {INSTALL_HINT}") from err


class OffscreenCamera:
    """One free camera of a MuJoCo model rendered offscreen to uint8 RGB (H, W, 3).

    Its GL context is made at the first ``render``, in the thread that renders (a context is current in
    one thread at a time), and made current again before each render: every env has its own context,
    and creating one (EGL) releases the one current before it.
    """

    def __init__(self, model: mujoco.MjModel, width: int, height: int, view: dict, backend: str,
                 hide_geoms: Iterable[int] = ()):  # fmt: skip
        self.model, self.width, self.height, self.backend = model, width, height, backend
        self.hide_geoms = frozenset(int(g) for g in hide_geoms)  # geom ids left out of the image
        # The offscreen framebuffer must hold the image (Fetch sizes it to its own render width/height).
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        self.camera = mujoco.MjvCamera()
        self.camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self.camera.lookat[:] = view["lookat"]
        self.camera.distance, self.camera.azimuth = view["distance"], view["azimuth"]
        self.camera.elevation = view["elevation"]
        self.option = mujoco.MjvOption()
        self._rect = mujoco.MjrRect(0, 0, width, height)
        self._gl = self._scene = self._context = None
        self._free = None

    def _start(self) -> None:
        try:
            self._gl = gl_context_class(self.backend)(self.width, self.height)
            self._gl.make_current()
        except GLUnavailable:
            raise
        except Exception as err:
            raise GLUnavailable(f"MUJOCO_GL={self.backend}: no GL context ({err}). {INSTALL_HINT}") from err
        self._scene = mujoco.MjvScene(self.model, maxgeom=1000)
        self._context = mujoco.MjrContext(self.model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        # Freed on close(), or at exit for an env never closed (mujoco's GLContext.__del__ fails at exit).
        self._free = weakref.finalize(self, _free_gl, self._gl, self._context)

    def render(self, data: mujoco.MjData) -> np.ndarray:
        if self._gl is None:
            self._start()
        self._gl.make_current()
        scene = self._scene
        mujoco.mjv_updateScene(self.model, data, self.option, None, self.camera, mujoco.mjtCatBit.mjCAT_ALL, scene)
        if self.hide_geoms:
            for i in range(scene.ngeom):
                geom = scene.geoms[i]
                if geom.objtype == mujoco.mjtObj.mjOBJ_GEOM and geom.objid in self.hide_geoms:
                    geom.rgba[3] = 0.0  # fully transparent: not drawn
        mujoco.mjr_render(self._rect, scene, self._context)
        image = np.empty((self.height, self.width, 3), np.uint8)
        mujoco.mjr_readPixels(image, None, self._rect, self._context)
        return np.ascontiguousarray(image[::-1])  # OpenGL's rows run bottom-up

    def close(self) -> None:
        if self._free is not None:
            self._free()
        self._gl = self._scene = self._context = self._free = None


def _free_gl(gl, context) -> None:
    try:
        gl.make_current()
        context.free()
        gl.free()
    except Exception:  # at exit EGL may already be terminated (its own atexit): nothing left to free
        pass


class FetchCamera(gym.ObservationWrapper):
    """A Fetch env with ``{"state": gripper state float32 (10,), "front": uint8 (size, size, 3)}`` observations.

    The GL backend is chosen (and checked) here, so an env that cannot render fails when it is made, saying
    what to install; its GL context is made at the first observation.
    """

    def __init__(self, env: gym.Env, size: int = IMAGE_SIZE, view: dict | None = None):
        try:
            backend = gl_backend()
        except GLUnavailable:
            env.close()  # make_env's caller never gets it to close
            raise
        super().__init__(env)
        model = env.unwrapped.model
        # Fetch's mocap target draws 1 m long green axes through the gripper's target: a simulator aid, not
        # something a real camera sees.
        mocap_body = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "robot0:mocap")
        mocap = np.flatnonzero(model.geom_bodyid == mocap_body)
        self.camera = OffscreenCamera(model, size, size, view or FETCH_VIEW, backend, hide_geoms=mocap)
        self.last_raw_obs: dict | None = None  # Fetch's own observation, for the scripted controllers
        self.observation_space = gym.spaces.Dict({
            STATE_KEY: gym.spaces.Box(-np.inf, np.inf, (len(GRIPPER_STATE),), np.float32),
            CAMERA: gym.spaces.Box(0, 255, (size, size, 3), np.uint8),
        })  # fmt: skip

    def observation(self, obs: dict) -> dict:
        self.last_raw_obs = obs
        base = self.env.unwrapped
        base._render_callback()  # Fetch's own pre-render step: puts the target0 site at this episode's goal
        state = np.asarray(obs["observation"][GRIPPER_STATE], np.float32)
        return {STATE_KEY: state, CAMERA: self.camera.render(base.data)}

    def close(self) -> None:
        self.camera.close()
        super().close()
