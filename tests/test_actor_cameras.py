"""The actor with cameras (issue 20): a pixel policy in onnxruntime acting on the env's split Dict observation,
chunks carrying each camera's frames in the segment layout, and refusals of a policy or an observation
that does not fit (real PointMaze pixels env, real onnxruntime, the actor's own MemorySink)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from o2o.actor.config import ActorConfig, PolicyConfig
from o2o.actor.loop import Actor
from o2o.actor.onnx_policy import OnnxPolicy, PolicyExpectation, PolicyMismatch
from o2o.actor.seams import FixedPolicySource, MemorySink
from o2o.datasets.policy_format import FORMAT_VERSION, input_names
from o2o.datasets.rows import frame_layout
from o2o.envs import make_actor_env, make_env
from o2o.envs.obs_spec import ObservationError

PIXELS = "pointmaze-umaze-pixels"
TOP = (48, 48, 3)


# ---------------------------------------------------------------- helpers


def pixel_policy(cameras: dict[str, tuple[int, int, int]], graph_shapes: dict | None = None, task: str = PIXELS,
                 state_dim: int = 2, action_dim: int = 2, version: int = 0) -> bytes:  # fmt: skip
    """A contract-following pixel policy (datasets/policy_format.py) whose action can be computed by hand:
    every action component is ``mean of all pixels of all cameras * 2 / 255 - 1`` (state and noise
    enter with weight 0). ``graph_shapes`` gives a camera input another shape than its metadata."""
    shapes = {**cameras, **(graph_shapes or {})}
    names = input_names(tuple(sorted(cameras)))
    inputs = [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", state_dim]),
              *[helper.make_tensor_value_info(name, TensorProto.UINT8, ["batch", *shapes[name]]) for name in sorted(cameras)],
              helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", action_dim])]  # fmt: skip
    nodes, means = [], []
    for name in sorted(cameras):
        nodes += [helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceMean", [f"{name}_f"], [f"{name}_m"], axes=[1, 2, 3], keepdims=0),
                  helper.make_node("Unsqueeze", [f"{name}_m", "axis1"], [f"{name}_mean"])]  # fmt: skip
        means.append(f"{name}_mean")
    total = helper.make_node("Sum", means, ["mean_sum"]) if means else helper.make_node("Identity", ["zero"], ["mean_sum"])
    nodes += [total,
              helper.make_node("Mul", ["mean_sum", "scale"], ["scaled"]),
              helper.make_node("Sub", ["scaled", "one"], ["pixel"]),
              helper.make_node("Mul", ["obs", "zero"], ["obs0"]),
              helper.make_node("Mul", ["noise", "zero"], ["noise0"]),
              helper.make_node("Add", ["obs0", "noise0"], ["zeros"]),
              helper.make_node("Add", ["pixel", "zeros"], ["action"])]  # fmt: skip
    constants = [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                 helper.make_tensor("scale", TensorProto.FLOAT, [], [2.0 / 255.0 / max(len(means), 1)]),
                 helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                 helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]  # fmt: skip
    graph = helper.make_graph(nodes, "pixel_policy", inputs,
                              [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", action_dim])],
                              initializer=constants)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"o2o_format_version": FORMAT_VERSION, "task": task, "obs_dim": str(state_dim),
            "action_dim": str(action_dim), "action_low": json.dumps([-1.0] * action_dim),
            "action_high": json.dumps([1.0] * action_dim), "policy_version": str(version), "training_step": "0",
            "input_names": json.dumps(list(names)), "output_names": json.dumps(["action"]),
            "noise": "standard_normal", "cameras": json.dumps({k: list(v) for k, v in cameras.items()})}  # fmt: skip
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def hand_action(images: list[np.ndarray]) -> np.float32:
    """What ``pixel_policy`` answers for these images (one per camera)."""
    return np.float32(sum(image.astype(np.float64).mean() for image in images) * 2.0 / 255.0 / len(images) - 1.0)


class Recorder(gym.Wrapper):
    """Keeps a copy of every observation the env returns: episodes[e][t] = observation t of episode e."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.episodes: list[list[dict]] = []

    def _keep(self, obs: dict) -> None:
        self.episodes[-1].append({key: np.array(value, copy=True) for key, value in obs.items()})

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.episodes.append([])
        self._keep(obs)
        return obs, info

    def step(self, action):
        obs, *rest = self.env.step(action)
        self._keep(obs)
        return (obs, *rest)


class FlippedSecondCamera(gym.ObservationWrapper):
    """The maze with a second 48x48x3 camera, "under": the top view upside down."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.Dict({**env.observation_space.spaces,
                                                  "under": gym.spaces.Box(0, 255, TOP, np.uint8)})  # fmt: skip

    def observation(self, obs: dict) -> dict:
        return {**obs, "under": np.ascontiguousarray(obs["top"][::-1])}


class ShrinkingCamera(gym.ObservationWrapper):
    """Declares 48x48 images but returns a 32x32 one from step ``bad_from`` of an episode on (a camera
    driver that changed resolution)."""

    def __init__(self, env: gym.Env, bad_from: int):
        super().__init__(env)
        self.bad_from, self.t = bad_from, 0

    def reset(self, **kwargs):
        self.t = -1
        return super().reset(**kwargs)

    def observation(self, obs: dict) -> dict:
        self.t += 1
        return {**obs, "top": obs["top"][:32, :32].copy()} if self.t >= self.bad_from else obs


class BadMaze(ShrinkingCamera):
    """A user's env (``env=test_actor_cameras:BadMaze``) whose camera turns 32x32 at its 4th step."""

    def __init__(self):
        super().__init__(make_env(PIXELS), bad_from=4)


def actor_env_takes_cameras() -> bool:
    try:
        make_actor_env(PIXELS).close()
        return True
    except ObservationError:
        return False


needs_camera_actor_env = pytest.mark.skipif(
    not actor_env_takes_cameras(),
    reason="envs/robot.py check_actor_env still refuses camera envs: o2o-actor cannot make the pixels env yet")


def pixels_env(steps: int, wrap=None) -> gym.Env:
    env = make_env(PIXELS)
    env = wrap(env) if wrap is not None else env
    return Recorder(gym.wrappers.TimeLimit(env, steps))


def camera_actor(env: gym.Env, policy: OnnxPolicy, chunk_rows: int, noise: float = 1.0) -> tuple[Actor, MemorySink]:
    cfg = ActorConfig(task=PIXELS, actor_id="cam", learner=None, chunk_rows=chunk_rows, log_every_s=1e9,
                      policy=PolicyConfig(noise_scale=noise))  # fmt: skip
    sink = MemorySink(keep=True)
    return Actor(env, sink, FixedPolicySource(policy), cfg), sink


def top_policy(**graph) -> OnnxPolicy:
    return OnnxPolicy(pixel_policy({"top": TOP}, **graph), PolicyExpectation(PIXELS, 2, 2, {"top": TOP}))


# ---------------------------------------------------------------- chunks carry the env's frames


def test_chunks_carry_the_rendered_frames_in_the_segment_layout_and_the_policy_sees_them():
    # 7-step episodes, 5-row chunks: each episode is a full chunk sent mid-episode, then a 2-row chunk
    # ended by the episode's end (truncated).
    env = pixels_env(steps=7)
    actor, sink = camera_actor(env, top_policy(), chunk_rows=5)
    assert actor.run(max_episodes=2) == "done"
    chunks = sink.chunks
    assert [(c.n, c.step, bool(c.truncated[-1])) for c in chunks] == [(5, 0, False), (2, 5, True)] * 2
    assert [c.episode_id for c in chunks] == [0, 0, 2, 2]
    for chunk in chunks:
        episode = env.episodes[chunks.index(chunk) // 2]
        frames = chunk.frames["top"]
        obs_frame, n_frames = frame_layout(chunk.terminated, chunk.truncated)
        assert frames.dtype == np.uint8 and frames.shape == (n_frames, *TOP) == (chunk.n + 1, *TOP)
        rendered = np.stack([o["top"] for o in episode[chunk.step : chunk.step + chunk.n + 1]])
        np.testing.assert_array_equal(frames, rendered)  # row i's obs image, then the last row's next image
        np.testing.assert_array_equal(frames[obs_frame + 1][:-1], frames[obs_frame][1:])  # next image = next row's
        # rows hold the state vectors (the ball's velocity), not the images
        states = np.stack([o["state"] for o in episode[chunk.step : chunk.step + chunk.n + 1]])
        np.testing.assert_array_equal(chunk.obs, states[:-1])
        np.testing.assert_array_equal(chunk.next_obs, states[1:])
        # the policy acted on row i's image: its action is the image's mean pixel, by hand
        np.testing.assert_allclose(chunk.action, np.repeat([[hand_action([f])] for f in frames[:-1]], 2, axis=1),
                                   atol=1e-5)  # fmt: skip
    # the ball moves (a few pixels at 48x48 in 7 steps): the frames differ, so the comparisons above tell them apart
    assert len({frames.tobytes() for c in chunks for frames in c.frames["top"]}) >= 4
    # a chunk sent mid-episode ends with the current observation's image; the next chunk starts with it
    np.testing.assert_array_equal(chunks[0].frames["top"][-1], chunks[1].frames["top"][0])
    # a new episode starts with its reset's image, not the previous episode's last one
    np.testing.assert_array_equal(chunks[2].frames["top"][0], env.episodes[1][0]["top"])
    assert not np.array_equal(chunks[2].frames["top"][0], chunks[1].frames["top"][-1])


def test_two_cameras_each_carry_their_frames_and_both_reach_the_policy():
    env = pixels_env(steps=6, wrap=FlippedSecondCamera)
    cameras = {"top": TOP, "under": TOP}
    policy = OnnxPolicy(pixel_policy(cameras), PolicyExpectation(PIXELS, 2, 2, cameras))
    actor, sink = camera_actor(env, policy, chunk_rows=4)
    actor.run(max_episodes=1)
    assert [c.n for c in sink.chunks] == [4, 2]
    for chunk in sink.chunks:
        rendered = env.episodes[0][chunk.step : chunk.step + chunk.n + 1]
        assert sorted(chunk.frames) == ["top", "under"]
        for name in cameras:
            np.testing.assert_array_equal(chunk.frames[name], np.stack([o[name] for o in rendered]))
        expected = [hand_action([top, under]) for top, under in zip(chunk.frames["top"], chunk.frames["under"])]
        np.testing.assert_allclose(chunk.action[:, 0], expected[:-1], atol=1e-5)


def test_a_policy_swap_mid_episode_sends_the_chunk_and_the_next_starts_at_the_current_frame():
    env = pixels_env(steps=50)
    actor, sink = camera_actor(env, top_policy(), chunk_rows=20)
    actor.run(max_steps=3)
    actor.policies = FixedPolicySource(OnnxPolicy(pixel_policy({"top": TOP}, version=1)))  # a new policy arrives
    actor.run(max_steps=4)
    assert [(c.n, c.policy_version) for c in sink.chunks] == [(3, 0), (4, 1)]
    first, second = (c.frames["top"] for c in sink.chunks)
    np.testing.assert_array_equal(first[-1], second[0])
    np.testing.assert_array_equal(np.concatenate([first, second[1:]]), np.stack([o["top"] for o in env.episodes[0]]))


def test_random_warm_up_actions_record_the_frames_too():
    env = pixels_env(steps=5)
    cfg = ActorConfig(task=PIXELS, actor_id="cam", learner=None, chunk_rows=8, log_every_s=1e9,
                      policy=PolicyConfig(act_before_policy=True))  # fmt: skip
    sink = MemorySink(keep=True)
    Actor(env, sink, FixedPolicySource(None), cfg).run(max_episodes=2)
    assert [(c.n, c.policy_version) for c in sink.chunks] == [(5, -1), (5, -1)]
    for chunk, episode in zip(sink.chunks, env.episodes):
        np.testing.assert_array_equal(chunk.frames["top"], np.stack([o["top"] for o in episode]))


# ---------------------------------------------------------------- refusals


def test_a_policy_for_other_cameras_is_refused_naming_the_camera_and_both_shapes():
    env_cameras = PolicyExpectation(PIXELS, 2, 2, {"top": TOP})
    with pytest.raises(PolicyMismatch, match=r"camera 'top' is \[64, 64, 3\] \(actor env: \[48, 48, 3\]\)"):
        OnnxPolicy(pixel_policy({"top": (64, 64, 3)}), env_cameras)
    with pytest.raises(PolicyMismatch, match=r"cameras \['front'\] \(actor env: \['top'\]\)"):
        OnnxPolicy(pixel_policy({"front": TOP}), env_cameras)
    with pytest.raises(PolicyMismatch, match=r"cameras \[\] \(actor env: \['top'\]\)"):  # a state policy
        OnnxPolicy(pixel_policy({}, task=PIXELS), env_cameras)
    # a graph whose input disagrees with its own metadata
    with pytest.raises(PolicyMismatch, match=r"graph input 'top' is tensor\(uint8\) \['batch', 64, 64, 3\]"):
        OnnxPolicy(pixel_policy({"top": TOP}, graph_shapes={"top": (64, 64, 3)}), env_cameras)


def test_a_wrong_size_image_from_the_env_stops_the_actor_before_anything_of_it_is_sent():
    env = pixels_env(steps=50, wrap=lambda e: ShrinkingCamera(e, bad_from=4))
    actor, sink = camera_actor(env, top_policy(), chunk_rows=20)
    message = (r"the env's observation 4 of the episode \(0 = the reset's\) does not match its declared space: "
               r"camera 'top': got uint8 \(32, 32, 3\), expected uint8 \(48, 48, 3\)")  # fmt: skip
    with pytest.raises(ObservationError, match=message):
        actor.run(max_steps=10)
    # the 3 whole transitions before it were sent, ending with the last good image; the bad frame is in none
    assert [c.n for c in sink.chunks] == [3]
    np.testing.assert_array_equal(sink.chunks[0].frames["top"], np.stack([o["top"] for o in env.episodes[0][:4]]))
    assert actor.stats.steps == 3 and sink.n_rows == 3  # the step that returned it is not counted


def test_a_wrong_size_image_at_reset_stops_the_actor_too():
    env = pixels_env(steps=50, wrap=lambda e: ShrinkingCamera(e, bad_from=0))
    actor, sink = camera_actor(env, top_policy(), chunk_rows=20)
    with pytest.raises(ObservationError, match=r"camera 'top': got uint8 \(32, 32, 3\)"):
        actor.run(max_steps=10)
    assert sink.n_chunks == 0 and actor.stats.steps == 0


# ---------------------------------------------------------------- o2o-actor


def run_actor_cli(tmp_path: Path, policy: bytes, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "policy.onnx").write_bytes(policy)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "o2o.actor.main", f"task={PIXELS}", "learner=null", "actor_id=cam",
                           f"policy.path={tmp_path / 'policy.onnx'}", f"stats_file={tmp_path / 'stats.json'}", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)  # fmt: skip


@needs_camera_actor_env
def test_o2o_actor_acts_on_the_pixels_task_and_refuses_a_policy_for_other_cameras(tmp_path):
    done = run_actor_cli(tmp_path, pixel_policy({"top": TOP}), "max_steps=30", "chunk_rows=8")
    assert done.returncode == 0, done.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())["actor"]
    assert stats["steps"] == 30 and stats["rows"] == 30 and stats["policy_version"] == 0
    refused = run_actor_cli(tmp_path, pixel_policy({"top": (64, 64, 3)}), "max_steps=30")
    assert refused.returncode == 2
    assert "camera 'top' is [64, 64, 3] (actor env: [48, 48, 3])" in refused.stderr
    # chunks the learner would refuse (frames over the wire's limit, transport/limits.py): refused at start
    too_big = run_actor_cli(tmp_path, pixel_policy({"top": TOP}), "chunk_rows=5000")
    assert too_big.returncode == 2
    assert ("chunk_rows=5000: the learner takes chunks of at most 4854 rows with these cameras (6912 image bytes "
            "per observation): set chunk_rows<=4854") in too_big.stderr  # 64 MiB // (2 frames per row * 6912 bytes)


@needs_camera_actor_env
def test_o2o_actor_stops_on_a_wrong_size_image_with_exit_2_and_one_line(tmp_path):
    result = run_actor_cli(tmp_path, pixel_policy({"top": TOP}), "env=test_actor_cameras:BadMaze", "max_steps=30")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("o2o-actor: error:")]
    assert errors == ["o2o-actor: error: the env's observation 4 of the episode (0 = the reset's) does not match its "
                      "declared space: camera 'top': got uint8 (32, 32, 3), expected uint8 (48, 48, 3) (resize the "
                      "frame to the declared size; keep it uint8)"]  # fmt: skip
    assert json.loads((tmp_path / "stats.json").read_text())["actor"]["rows"] == 3  # the good transitions only
