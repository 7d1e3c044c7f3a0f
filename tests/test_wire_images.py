"""Camera frames on the wire: the segment layout round trip, each bad frame rejected with its reason,
the hello's cameras checked by the learner, size limits from the spec, and a spooled camera chunk
surviving a reopen. Real msgpack frames, real sockets on loopback, a real store and spool on disk."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import numpy as np
import pytest
from test_online_learner import free_endpoint

from o2o.actor.seams import PolicyBuilder
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.rows import frame_layout
from o2o.envs.obs_spec import CameraSpec, ObsSpec
from o2o.transport import wire
from o2o.transport.config import LinkConfig
from o2o.transport.ingest import IngestServer
from o2o.transport.link import Link
from o2o.transport.sessions import check_hello
from o2o.transport.spool import Spool

STATE_DIM, ACT_DIM = 2, 2
FRONT, WRIST = CameraSpec("front", 6, 5, 3), CameraSpec("wrist", 4, 4, 1)  # H != W: a transposed image is caught
OBS_SPEC = ObsSpec(STATE_DIM, (FRONT, WRIST))
SPEC = wire.ChunkSpec.for_obs(OBS_SPEC, ACT_DIM)
TASK = "cam-task"
N_ROWS = 5
END_ROW = 2  # row 2 ends episode A (steps 0..2); rows 3, 4 are episode B's steps 0, 1
# The frames of that chunk, by hand: episode A's observations at steps 0, 1, 2 and the next observation of
# its last row, then episode B's steps 0, 1 and its last row's next observation. An image's id is
# 10 * episode (1 = A, 2 = B) + step; the id of the observation after a step-2 row is then 13.
FRAME_IDS = [10, 11, 12, 13, 20, 21, 22]
OBS_IDS = [10, 11, 12, 20, 21]  # row i's observation
NEXT_IDS = [11, 12, 13, 21, 22]  # row i's next observation


def image(camera: CameraSpec, image_id: int) -> np.ndarray:
    """Channel 0 holds the image id (+100 on the wrist camera); the others the pixel's row and column."""
    img = np.zeros(camera.shape, np.uint8)
    img[..., 0] = image_id + (100 if camera is WRIST else 0)
    if camera.channels > 1:
        img[..., 1] = np.arange(camera.height)[:, None]
        img[..., 2] = np.arange(camera.width)[None, :]
    return img


def camera_chunk(seq: int = 0, actor_id: str = "cam-1", truncate: bool = False) -> wire.TransitionChunk:
    """Five rows spanning an episode end at row 2 (terminated, or truncated), frames per FRAME_IDS."""
    ends = np.zeros(N_ROWS, np.uint8)
    ends[END_ROW] = 1
    obs_ids, next_ids = np.array(OBS_IDS, np.float32), np.array(NEXT_IDS, np.float32)
    return wire.TransitionChunk(
        actor_id=actor_id, seq=seq, policy_version=3, episode_id=7, step=0,
        obs=np.stack([obs_ids, -obs_ids], axis=1), action=np.full((N_ROWS, ACT_DIM), 0.5, np.float32),
        reward=np.arange(N_ROWS, dtype=np.float32), next_obs=np.stack([next_ids, -next_ids], axis=1),
        terminated=ends * (not truncate), truncated=ends * truncate, success=np.zeros(N_ROWS, np.uint8),
        frames={cam.name: np.stack([image(cam, i) for i in FRAME_IDS]) for cam in (WRIST, FRONT)},  # not sorted
    )  # fmt: skip


def frames_of(chunk: wire.TransitionChunk) -> list[bytes]:
    return [bytes(f) for f in wire.encode_chunk(chunk)]


def header_of(frames: list[bytes]) -> dict:
    return msgpack.unpackb(frames[0])


def with_arrays(frames: list[bytes], index: int, entry: list | None, frame: bytes | None) -> list[bytes]:
    """``frames`` with array ``index`` (0 = obs) described by ``entry`` and holding ``frame``; None drops it."""
    header = header_of(frames)
    arrays = list(frames[1:])
    if entry is None:
        del header["arrays"][index], arrays[index]
    else:
        header["arrays"][index: index + 1], arrays[index: index + 1] = [entry], [frame]
    return [msgpack.packb(header), *arrays]


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("truncate", [False, True], ids=["terminated", "truncated"])
def test_a_chunk_across_an_episode_end_round_trips_its_frames_in_the_segment_layout(truncate):
    frames = frames_of(camera_chunk(truncate=truncate))
    # The 7 row arrays, then one frame per camera in the order of their names.
    assert [e[0] for e in header_of(frames)["arrays"]] == [*wire.ARRAY_NAMES, "frames/front", "frames/wrist"]
    assert header_of(frames)["arrays"][7:] == [
        ["frames/front", "|u1", [7, 6, 5, 3]], ["frames/wrist", "|u1", [7, 4, 4, 1]],
    ]  # fmt: skip
    got = wire.decode(frames, SPEC)
    assert sorted(got.frames) == ["front", "wrist"]
    front, wrist = got.frames["front"], got.frames["wrist"]
    assert front.dtype == np.uint8 and front.shape == (7, 6, 5, 3) and wrist.shape == (7, 4, 4, 1)
    assert front[:, 0, 0, 0].tolist() == FRAME_IDS and wrist[:, 3, 3, 0].tolist() == [100 + i for i in FRAME_IDS]
    assert front[2, 4, 3, 1:].tolist() == [4, 3]  # row 4, column 3 of frame 2: rows and columns in place
    np.testing.assert_array_equal(front, np.stack([image(FRONT, i) for i in FRAME_IDS]))
    # The layout tells each row's frames: the hand-written ids per row.
    obs_frame, n_frames = frame_layout(got.terminated, got.truncated)
    assert n_frames == 7 and obs_frame.tolist() == [0, 1, 2, 4, 5]
    assert front[obs_frame, 0, 0, 0].tolist() == OBS_IDS and front[obs_frame + 1, 0, 0, 0].tolist() == NEXT_IDS
    np.testing.assert_array_equal(got.obs[:, 0], OBS_IDS)  # obs is the state vector
    # The frames view the received bytes, read-only: no copy was made.
    assert np.shares_memory(front, np.frombuffer(frames[8], np.uint8)) and not front.flags.writeable


def test_a_chunk_without_an_episode_end_carries_one_frame_more_than_rows():
    chunk = camera_chunk()
    flags = np.zeros(N_ROWS, np.uint8)
    ids = [10, 11, 12, 13, 14, 15]  # one episode: 5 observations and the last row's next one
    one = wire.TransitionChunk(
        "cam-1", 0, 3, 7, 0, chunk.obs, chunk.action, chunk.reward, chunk.next_obs, flags, flags, flags,
        frames={cam.name: np.stack([image(cam, i) for i in ids]) for cam in (FRONT, WRIST)},
    )  # fmt: skip
    got = wire.decode(frames_of(one), SPEC)
    assert got.frames["front"][:, 0, 0, 0].tolist() == ids


def test_a_camera_task_without_a_state_vector_sends_empty_obs_arrays():
    spec = wire.ChunkSpec.for_obs(ObsSpec(0, (FRONT,)), ACT_DIM)
    chunk = camera_chunk()
    empty = np.zeros((N_ROWS, 0), np.float32)
    chunk = dataclasses.replace(chunk, obs=empty, next_obs=empty, frames={"front": chunk.frames["front"]})
    got = wire.decode(frames_of(chunk), spec)
    assert got.obs.shape == (N_ROWS, 0) and got.frames["front"][:, 0, 0, 0].tolist() == FRAME_IDS
    with pytest.raises(ValueError, match="obs_dim"):
        wire.ChunkSpec(0, ACT_DIM)  # a state task needs its state
    hello = wire.Hello("a", TASK, 0, ACT_DIM, 0, cameras={"front": [6, 5, 3]})
    check_hello(wire.decode(wire.encode(hello)), None, TASK, spec)


def test_a_state_chunk_and_hello_are_the_same_bytes_as_before_cameras():
    obs = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    flags = np.array([0, 1], np.uint8)
    chunk = wire.TransitionChunk("a", 4, 2, 9, 17, obs, obs * 2, np.array([0.5, 1.0], np.float32), obs + 1,
                                 flags, 1 - flags, flags)  # fmt: skip
    frames = frames_of(chunk)
    header = {"v": 1, "type": "chunk", "actor_id": "a", "seq": 4, "policy_version": 2, "episode_id": 9, "step": 17,
              "n": 2, "eval": False,
              "arrays": [["obs", "<f4", [2, 2]], ["action", "<f4", [2, 2]], ["reward", "<f4", [2]],
                         ["next_obs", "<f4", [2, 2]], ["terminated", "|u1", [2]], ["truncated", "|u1", [2]],
                         ["success", "|u1", [2]]]}  # fmt: skip
    assert frames[0] == msgpack.packb(header, use_bin_type=True)
    assert frames[1:] == [obs.tobytes(), (obs * 2).tobytes(), np.float32([0.5, 1.0]).tobytes(), (obs + 1).tobytes(),
                          b"\x00\x01", b"\x01\x00", b"\x00\x01"]  # fmt: skip
    assert wire.decode(frames, wire.ChunkSpec(2, 2)).frames == {}
    hello = {"v": 1, "type": "hello", "actor_id": "a", "task": "t", "obs_dim": 2, "action_dim": 2, "next_seq": 0,
             "policy_version": -1, "policy_run": "", "instance": ""}  # no "cameras" key  # fmt: skip
    assert wire.encode(wire.Hello("a", "t", 2, 2, 0)) == [msgpack.packb(hello, use_bin_type=True)]


def test_the_actor_cannot_encode_frames_that_break_the_layout_or_are_not_uint8():
    chunk = camera_chunk()
    for frames, what in [
        ({**chunk.frames, "front": chunk.frames["front"].astype(np.float32)}, "float32"),
        ({**chunk.frames, "front": chunk.frames["front"][:6]}, "(6, 6, 5, 3)"),  # one per row: no next frame
    ]:
        bad = dataclasses.replace(chunk, frames=frames)
        with pytest.raises(ValueError, match="camera 'front'") as err:
            wire.encode_chunk(bad)
        assert what in str(err.value) and "(7, H, W, C)" in str(err.value)


# ---------------------------------------------------------------- rejections


GOOD = frames_of(camera_chunk())
FRONT_AT = 7  # array index of frames/front (after the 7 row arrays)


def _transposed(frames):
    front = np.frombuffer(frames[1 + FRONT_AT], np.uint8).reshape(7, 6, 5, 3).transpose(0, 2, 1, 3)
    return with_arrays(frames, FRONT_AT, ["frames/front", "|u1", [7, 5, 6, 3]], np.ascontiguousarray(front).tobytes())


def _one_frame_per_row(frames):  # a naive actor: n frames, no next frame at the episode end
    return with_arrays(frames, FRONT_AT, ["frames/front", "|u1", [5, 6, 5, 3]], frames[1 + FRONT_AT][: 5 * 90])


def _flags_moved(frames):  # the end moves to the last row: one segment, 6 frames; the chunk carries 7
    flags = np.zeros(N_ROWS, np.uint8)
    flags[-1] = 1
    return [*frames[:5], flags.tobytes(), *frames[6:]]


def _float_frames(frames):
    front = np.frombuffer(frames[1 + FRONT_AT], np.uint8).astype("<f4")
    return with_arrays(frames, FRONT_AT, ["frames/front", "<f4", [7, 6, 5, 3]], front.tobytes())


def _extra_camera(frames):
    header = header_of(frames)
    header["arrays"].append(["frames/zoom", "|u1", [7, 2, 2, 1]])
    return [msgpack.packb(header), *frames[1:], bytes(28)]


def _renamed(frames):
    return with_arrays(frames, FRONT_AT, ["frames/back", "|u1", [7, 6, 5, 3]], frames[1 + FRONT_AT])


def _swapped(frames):  # the cameras out of name order
    header = header_of(frames)
    header["arrays"][7], header["arrays"][8] = header["arrays"][8], header["arrays"][7]
    return [msgpack.packb(header), *frames[1:8], frames[9], frames[8]]


@pytest.mark.parametrize(
    "corrupt, reason, says",
    [
        (lambda f: with_arrays(f, FRONT_AT, None, None), wire.BAD_FRAMES, "'front'"),
        (lambda f: f[:-1], wire.BAD_FRAMES, "10 frames (header, 7 arrays, one per camera of ['front', 'wrist']), got 9"),
        (_extra_camera, wire.BAD_FRAMES, "got 11"),
        (_renamed, wire.BAD_HEADER, "frames/front"),
        (_swapped, wire.BAD_HEADER, "frames/front"),
        (_float_frames, wire.BAD_DTYPE, "'|u1'"),
        (_transposed, wire.BAD_SHAPE, "camera 'front' is 6x5x3 in the task's spec"),
        (_one_frame_per_row, wire.BAD_SHAPE, "expected [7, 6, 5, 3]"),
        (_flags_moved, wire.BAD_SHAPE, "expected [6, 6, 5, 3]"),
        (lambda f: [*f[:-1], f[-1][:-1]], wire.BAD_LENGTH, "frames/wrist frame has 111 bytes"),
    ],
    ids=["missing-camera", "missing-frame", "extra-camera", "wrong-name", "cameras-swapped", "float-frames",
         "transposed-image", "one-frame-per-row", "frame-count-from-flags", "short-frame"],
)  # fmt: skip
def test_bad_camera_frames_are_rejected_with_their_reason(corrupt, reason, says):
    with pytest.raises(wire.WireError) as err:
        wire.decode(corrupt(GOOD), SPEC)
    assert err.value.reason == reason, err.value
    assert says in err.value.message, err.value.message
    assert (err.value.actor_id, err.value.seq) == ("cam-1", 0)


def test_a_state_spec_refuses_image_frames_and_a_camera_spec_refuses_a_state_chunk():
    with pytest.raises(wire.WireError) as err:
        wire.decode(GOOD, wire.ChunkSpec(STATE_DIM, ACT_DIM))
    assert err.value.reason == wire.BAD_FRAMES and "no camera frames" in err.value.message
    state_only = frames_of(dataclasses.replace(camera_chunk(), frames={}))
    with pytest.raises(wire.WireError) as err:
        wire.decode(state_only, SPEC)
    assert err.value.reason == wire.BAD_FRAMES and "['front', 'wrist']" in err.value.message


# ---------------------------------------------------------------- size limits


def test_size_limits_come_from_the_cameras():
    maze = wire.ChunkSpec.for_obs(ObsSpec(2, (CameraSpec("maze_top", 84, 84, 3),)), 2)
    # 64 MiB of frames, at most 2 frames per row of 84 * 84 * 3 = 21,168 bytes: 67,108,864 // 42,336 rows.
    assert maze.max_rows == 1585
    assert maze.max_frame_bytes == 2 * 1585 * 21168 <= wire.MAX_CHUNK_FRAME_BYTES  # the largest valid frame
    two = wire.ChunkSpec.for_obs(ObsSpec(2, (CameraSpec("a", 84, 84, 3), CameraSpec("b", 84, 84, 3))), 2)
    assert two.max_rows == 792  # 67,108,864 // (2 * 42,336)
    assert wire.ChunkSpec.for_obs(ObsSpec(2), 2) == wire.ChunkSpec(2, 2, 16384)  # state tasks as before
    assert wire.ChunkSpec(5, 3).max_frame_bytes == 16384 * 5 * 4
    with pytest.raises(ValueError, match="exceeds the 1585 rows"):
        wire.ChunkSpec.for_obs(ObsSpec(2, (CameraSpec("maze_top", 84, 84, 3),)), 2, max_rows=2000)
    with pytest.raises(ValueError, match="one row"):
        wire.ChunkSpec.for_obs(ObsSpec(2, (CameraSpec("huge", 4096, 4096, 3),)), 2)


def test_a_chunk_over_the_row_limit_is_refused_before_its_frames_are_read():
    small = wire.ChunkSpec.for_obs(OBS_SPEC, ACT_DIM, max_rows=4)
    with pytest.raises(wire.WireError) as err:
        wire.decode(GOOD, small)
    assert err.value.reason == wire.TOO_LARGE and "4 rows" in err.value.message


# ---------------------------------------------------------------- hello


def test_the_hello_carries_the_cameras_and_checks_them_strictly():
    hello = wire.Hello("a", TASK, 2, 2, 0, cameras={"front": [6, 5, 3]})
    assert wire.decode(wire.encode(hello)) == hello
    header = header_of(wire.encode(hello))
    for bad in [[6, 5], [6, 5, 3, 1], [6, 5, True], [6, 0, 3], [6, 5, 3.0], "6x5x3", [2**16, 5, 3]]:
        with pytest.raises(wire.WireError) as err:
            wire.decode([msgpack.packb({**header, "cameras": {"front": bad}})])
        assert err.value.reason == wire.BAD_HEADER, bad
    for bad in [[["front", [6, 5, 3]]], {"": [6, 5, 3]}, {f"c{i}": [1, 1, 1] for i in range(17)}]:
        with pytest.raises(wire.WireError) as err:
            wire.decode([msgpack.packb({**header, "cameras": bad})])
        assert err.value.reason == wire.BAD_HEADER, bad
    del header["cameras"]  # an older actor
    assert wire.decode([msgpack.packb(header)]).cameras == {}


@pytest.mark.parametrize(
    "cameras, says",
    [
        ({"front": [6, 5, 3]}, "camera 'wrist' absent (learner: 4x4x1)"),
        ({"front": [84, 84, 3], "wrist": [4, 4, 1]}, "camera 'front' 84x84x3 (learner: 6x5x3)"),
        ({"front": [6, 5, 3], "wrist": [4, 4, 1], "top": [4, 4, 1]}, "camera 'top' 4x4x1 (learner: absent)"),
        ({}, "camera 'front' absent (learner: 6x5x3); camera 'wrist' absent (learner: 4x4x1)"),
    ],
)
def test_a_hello_whose_cameras_differ_from_the_learners_is_refused(cameras, says):
    with pytest.raises(wire.WireError) as err:
        check_hello(wire.Hello("a", TASK, STATE_DIM, ACT_DIM, 0, cameras=cameras), None, TASK, SPEC)
    assert err.value.reason == wire.BAD_SPEC and says in err.value.message, err.value.message
    check_hello(wire.Hello("a", TASK, STATE_DIM, ACT_DIM, 0, cameras=SPEC.camera_shapes), None, TASK, SPEC)
    with pytest.raises(wire.WireError):  # a state learner refuses a camera actor
        check_hello(wire.Hello("a", TASK, 2, 2, 0, cameras={"front": [6, 5, 3]}), None, TASK, wire.ChunkSpec(2, 2))


# ---------------------------------------------------------------- over loopback: link, ingest, store


class RecordingStore(ReplayStore):
    """A real store on disk that also keeps what the ingest server handed to ``append``."""

    appended: list

    def append(self, chunk):
        self.appended.append(chunk)
        return super().append(chunk)


def camera_server(tmp_path) -> IngestServer:
    store = RecordingStore.create(tmp_path / "replay", OBS_SPEC, ACT_DIM, chunk_rows=64, task=TASK)
    store.appended = []
    server = IngestServer(store, free_endpoint(), commit_interval_s=0.005).start()
    assert server.spec == SPEC  # built from the store's cameras
    return server


def camera_link(endpoint: str, tmp_path, actor_id: str, cameras: dict) -> Link:
    spool = Spool(16, str(tmp_path / f"spool-{actor_id}"), 2**24, 2**20)
    cfg = LinkConfig(heartbeat_s=0.1, timeout_s=2.0, drain_s=5.0)
    return Link(endpoint, actor_id, TASK, STATE_DIM, ACT_DIM, spool, PolicyBuilder(None), cfg,
                cameras=cameras).start()  # fmt: skip


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout  # a hang guard, not a timing assertion
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_camera_chunks_reach_the_store_whole_and_a_bad_one_is_counted_without_touching_it(tmp_path):
    server = camera_server(tmp_path)
    store = server.store
    try:
        wrong = camera_link(server.endpoint, tmp_path, "wrong", {"front": [84, 84, 3], "wrist": [4, 4, 1]})
        try:
            wait_for(lambda: wrong.fatal is not None, "the learner to refuse the actor with the wrong camera")
            assert "camera 'front' 84x84x3 (learner: 6x5x3)" in wrong.fatal and not wrong.wait_welcome(0)
        finally:
            wrong.close(drain_s=0)  # as the actor does on a fatal refusal (else it says hello every heartbeat)
        link = camera_link(server.endpoint, tmp_path, "cam-1", OBS_SPEC.to_dict()["cameras"])
        try:
            assert link.wait_welcome(30) and link.fatal is None
            link.add(camera_chunk(seq=0))
            wait_for(lambda: link.stats.acked_seq == 0, "the first chunk to be committed")
            committed = len(store)
            bad = camera_chunk(seq=1)
            link.add(dataclasses.replace(bad, frames={**bad.frames, "front": bad.frames["front"][:, :5]}))  # 5x5
            wait_for(lambda: link.stats.rejected, "the bad chunk to be rejected")
            link.add(camera_chunk(seq=2))
            wait_for(lambda: link.stats.acked_seq == 2, "the chunk after it to be committed")
        finally:
            link.close(drain_s=0)
    finally:
        server.stop()
    assert link.stats.rejected == {wire.BAD_SHAPE: 1}
    stats = server.stats()
    # The wrong actor's hellos (one per heartbeat until it closed) and the bad chunk, counted by reason.
    assert stats["rejected"].keys() == {wire.BAD_SPEC, wire.BAD_SHAPE} and stats["rejected"][wire.BAD_SHAPE] == 1
    assert stats["actors"]["cam-1"]["rejected"] == {wire.BAD_SHAPE: 1}
    assert [c.seq for c in store.appended] == [0, 2] and committed == N_ROWS and len(store) == 2 * N_ROWS
    for got in store.appended:  # the frames as sent, unchanged
        assert sorted(got.frames) == ["front", "wrist"]
        np.testing.assert_array_equal(got.frames["front"], camera_chunk().frames["front"])
        np.testing.assert_array_equal(got.frames["wrist"], camera_chunk().frames["wrist"])
    rows = ReplayStore.open(tmp_path / "replay", "r").read()  # flat rows: frames indexed per row
    np.testing.assert_array_equal(rows["obs"][:, 0], OBS_IDS * 2)
    front = rows["frames/front"]
    assert front[rows["obs_frame"], 0, 0, 0].tolist() == OBS_IDS * 2
    assert front[rows["next_frame"], 0, 0, 0].tolist() == NEXT_IDS * 2


def test_a_spooled_camera_chunk_survives_a_close_and_reopen(tmp_path):
    folder = tmp_path / "spool"
    spool = Spool(memory_chunks=1, folder=folder)
    for seq in range(3):  # past memory_chunks: chunks 1 and 2 are read back from disk
        spool.put(seq, wire.encode_chunk(camera_chunk(seq=seq)))
    spool.close()
    reopened = Spool(memory_chunks=1, folder=folder)
    try:
        assert (reopened.first_seq, reopened.last_seq) == (0, 2)
        for seq in range(3):
            got = wire.decode(reopened.get(seq), SPEC)
            assert got.seq == seq and got.frames["front"][:, 0, 0, 0].tolist() == FRAME_IDS
            np.testing.assert_array_equal(got.frames["wrist"], camera_chunk().frames["wrist"])
    finally:
        reopened.close()
