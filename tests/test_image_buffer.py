"""The learner's uint8 frame buffer: each frame held once, every sampled row gets exactly its own obs
and next images (pixels encode which observation they are), across wrap-around of the row ring and
the frame ring, for 1-step and long episodes; offline + online batches concatenate; the memory figure."""

import numpy as np
import pytest
import torch

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.minari_io import Transitions
from o2o.datasets.replay_store import CommitEvent, ReplayStore, StoreError
from o2o.datasets.rows import TransitionChunk, frame_layout
from o2o.envs.obs_spec import CameraSpec, ObsSpec
from o2o.learner.buffer import Batch, TransitionBuffer, concat_batches, default_frame_capacity
from o2o.learner.fleet import open_store
from o2o.learner.online_data import OnlineData, mixed_batch
from o2o.learner.retrain import select_store_rows

CAMS = (CameraSpec("front", 3, 2, 3), CameraSpec("wrist", 2, 2, 1))
SPEC = ObsSpec(2, CAMS)
ACT = 1


def image(camera: CameraSpec, episode: int, step: int) -> np.ndarray:
    """The observation (episode < 65, step < 1000) as camera pixels: its id in the first two bytes, the rest a
    per-camera pattern, so a frame of another row, another camera or another slot reads differently."""
    ident = episode * 1000 + step
    flat = (np.arange(camera.frame_bytes) * 7 + ident + len(camera.name)) % 251
    flat[:2] = ident // 256, ident % 256
    return flat.astype(np.uint8).reshape(camera.shape)


def ident(images: torch.Tensor) -> np.ndarray:
    """Each image's (episode * 1000 + step), decoded from its pixels."""
    flat = images.reshape(len(images), -1).cpu().numpy().astype(np.int64)
    return flat[:, 0] * 256 + flat[:, 1]


def segment_rows(episodes: list[tuple[int, int, int]], last_open: bool = False) -> dict:
    """Flat row dict (the store's / commit events' contract) of episode slices ``(episode, first step,
    steps)``, the last step of each slice ending its episode (but the last slice's if ``last_open``):
    state = (episode, step), frames in the segment layout (datasets/rows.py ``frame_layout``)."""
    ep = np.concatenate([np.full(n, e) for e, _, n in episodes])
    step = np.concatenate([np.arange(s, s + n) for _, s, n in episodes])
    ends = np.zeros(len(ep), bool)
    ends[np.cumsum([n for *_, n in episodes]) - 1] = True
    ends[-1] &= not last_open
    obs_frame, count = frame_layout(ends, np.zeros_like(ends))
    frames = {}
    for camera in CAMS:
        frames[camera.name] = np.zeros((count, *camera.shape), np.uint8)
        frames[camera.name][obs_frame] = [image(camera, e, s) for e, s in zip(ep, step)]
        frames[camera.name][obs_frame + 1] = [image(camera, e, s + 1) for e, s in zip(ep, step)]
    obs = np.stack([ep, step], 1).astype(np.float32)
    return {
        "obs": obs, "next_obs": obs + [0, 1], "action": np.zeros((len(ep), ACT), np.float32),
        "reward": step.astype(np.float32), "terminated": ends, "mc_return": np.zeros(len(ep), np.float32),
        "eval": np.zeros(len(ep), bool), "obs_frame": obs_frame, "next_frame": obs_frame + 1,
        **{f"frames/{name}": f for name, f in frames.items()},
    }  # fmt: skip


def add(buffer: TransitionBuffer, rows: dict) -> None:
    frames = {k[len("frames/"):]: v for k, v in rows.items() if k.startswith("frames/")}
    buffer.add(**{k: rows[k] for k in ("obs", "action", "reward", "next_obs", "terminated", "mc_return",
                                       "obs_frame", "next_frame")}, frames=frames)  # fmt: skip


def assert_own_images(batch: Batch) -> None:
    """Every row's obs / next images are those of its own (episode, step) / (episode, step + 1)."""
    obs = batch.obs.cpu().numpy().astype(np.int64)
    want = obs[:, 0] * 1000 + obs[:, 1]
    assert sorted(batch.images) == sorted(batch.next_images) == ["front", "wrist"]
    for camera in CAMS:
        assert batch.images[camera.name].dtype == torch.uint8 and batch.next_images[camera.name].dtype == torch.uint8
        assert batch.images[camera.name].shape == (len(obs), *camera.shape)
        np.testing.assert_array_equal(ident(batch.images[camera.name]), want)
        np.testing.assert_array_equal(ident(batch.next_images[camera.name]), want + 1)
        # The whole image, not only its id: a row never gets a torn or foreign frame.
        for row in range(0, len(obs), max(1, len(obs) // 16)):
            np.testing.assert_array_equal(batch.images[camera.name][row].cpu().numpy(), image(camera, *obs[row]))
            np.testing.assert_array_equal(batch.next_images[camera.name][row].cpu().numpy(),
                                          image(camera, obs[row, 0], obs[row, 1] + 1))  # fmt: skip


def sampled_ids(buffer: TransitionBuffer, n: int = 4000) -> set:
    batch = buffer.sample(n)
    assert_own_images(batch)
    obs = batch.obs.numpy().astype(np.int64)
    return set(map(tuple, obs))


def test_frames_stay_uint8_and_one_step_episodes_leave_with_their_overwritten_frames():
    buffer = TransitionBuffer(SPEC, ACT, capacity=6, device="cpu", frame_capacity=8)
    assert all(ring.dtype == torch.uint8 for ring in buffer.ring.frames.values())
    # Six 1-step episodes: 2 frames each, 12 frames; the ring keeps the last 8 = the last 4 rows.
    add(buffer, segment_rows([(e, 0, 1) for e in range(3)]))
    add(buffer, segment_rows([(e, 0, 1) for e in range(3, 6)]))
    assert buffer.size == 6 and len(buffer) == 4
    assert sampled_ids(buffer) == {(e, 0) for e in range(2, 6)}
    # One long episode of 6 rows, 7 frames: all its rows fit both rings (the 1-step rows are gone).
    add(buffer, segment_rows([(10, 0, 6)]))
    assert len(buffer) == 6 and sampled_ids(buffer) == {(10, s) for s in range(6)}


def test_rows_get_their_own_images_across_many_wraps_of_both_rings():
    rng = np.random.default_rng(0)
    buffer = TransitionBuffer(SPEC, ACT, capacity=50, device="cpu", frame_capacity=57)
    lengths = rng.choice([1, 1, 2, 5, 30], size=200)  # 1-step and long episodes
    stream = [(e, t) for e, length in enumerate(lengths) for t in range(length)]
    history, slices, at = [], [], 0  # every row added, oldest first; the slice (a segment) of each
    for c in range(60):  # ~15 row-ring and frame-ring wraps, chunks cutting episodes anywhere
        chunk = stream[at:at + int(rng.integers(1, 20))]
        at += len(chunk)
        history += chunk
        episodes = dict.fromkeys(e for e, _ in chunk)  # (episode, first step, steps) of each slice
        parts = [(e, min(t for x, t in chunk if x == e), sum(x == e for x, _ in chunk)) for e in episodes]
        slices += [(c, i) for i, (*_, n) in enumerate(parts) for _ in range(n)]
        add(buffer, segment_rows(parts))
        # By hand: the newest rows that fit both rings. The last k rows use one frame each plus one
        # per segment they touch (a segment of j rows has j + 1 frames).
        window = max(k for k in range(1, 51) if k <= len(history) and k + len(set(slices[-k:])) <= 57)
        assert len(buffer) == window
        assert sampled_ids(buffer, 2000) == set(history[-window:])
    assert buffer.ring.written > 10 * 57 and buffer.size == 50


def test_a_chunk_larger_than_either_ring_keeps_its_newest_rows():
    buffer = TransitionBuffer(SPEC, ACT, capacity=10, device="cpu", frame_capacity=12)
    add(buffer, segment_rows([(0, 0, 3), (1, 0, 20)]))  # 23 rows, 25 frames
    assert len(buffer) == 10 and sampled_ids(buffer) == {(1, s) for s in range(10, 20)}
    buffer = TransitionBuffer(SPEC, ACT, capacity=10, device="cpu", frame_capacity=12)
    add(buffer, segment_rows([(e, 0, 1) for e in range(10)]))  # 10 rows, 20 frames: the last 6 fit
    assert len(buffer) == 6 and sampled_ids(buffer) == {(e, 0) for e in range(4, 10)}


def test_interleaved_episodes_of_a_store_read_leave_by_the_age_of_their_frames():
    """A store read interleaves actors: actor a's later rows point back at a's frames from before actor
    b's rows. When those frames are overwritten, exactly the rows that used them leave the window."""
    frames = [(0, 0), (0, 1), (0, 2), (50, 0), (50, 1), (0, 3), (0, 4)]  # each frame once, in store order
    rows = [((0, 0), 0, 1), ((0, 1), 1, 2), ((50, 0), 3, 4), ((0, 2), 2, 5), ((0, 3), 5, 6)]  # (row, obs, next)
    obs = np.array([r for r, _, _ in rows], np.float32)
    flat = {
        "obs": obs, "next_obs": obs + [0, 1], "action": np.zeros((5, ACT), np.float32), "reward": np.zeros(5, np.float32),
        "terminated": np.zeros(5, np.float32), "mc_return": np.zeros(5, np.float32),
        "obs_frame": np.array([o for _, o, _ in rows]), "next_frame": np.array([n for *_, n in rows]),
        **{f"frames/{c.name}": np.stack([image(c, *f) for f in frames]) for c in CAMS},
    }  # fmt: skip
    buffer = TransitionBuffer(SPEC, ACT, capacity=20, device="cpu", frame_capacity=8)
    add(buffer, flat)
    assert len(buffer) == 5 and buffer.ring.written == 7 and sampled_ids(buffer) == {r for r, _, _ in rows}
    add(buffer, segment_rows([(20, 0, 1), (21, 0, 1)]))  # 4 more frames: (0, 0), (0, 1), (0, 2) are overwritten
    assert sampled_ids(buffer) == {(50, 0), (0, 3), (20, 0), (21, 0)}


def test_bad_frames_are_refused_and_nothing_is_touched():
    buffer = TransitionBuffer(SPEC, ACT, capacity=10, device="cpu")
    add(buffer, segment_rows([(0, 0, 4)]))
    before = {k: v.clone() for k, v in buffer.ring.frames.items()}
    bad = segment_rows([(1, 0, 3)])
    bad["frames/front"] = bad["frames/front"].astype(np.float32)
    with pytest.raises(ValueError, match="'front' frames: got float32"):
        add(buffer, bad)
    wrong_shape = segment_rows([(1, 0, 3)])
    wrong_shape["frames/wrist"] = np.zeros((5, 2, 3, 1), np.uint8)
    with pytest.raises(ValueError, match="'wrist' frames: got uint8"):
        add(buffer, wrong_shape)
    out_of_range = segment_rows([(1, 0, 3)])
    out_of_range["next_frame"] = out_of_range["next_frame"] + 1
    with pytest.raises(ValueError, match=r"frame indices must lie in \[0, 4\)"):
        add(buffer, out_of_range)
    state_only = segment_rows([(1, 0, 3)])
    with pytest.raises(ValueError, match="without frames for a buffer with cameras"):
        buffer.add(**{k: state_only[k] for k in ("obs", "action", "reward", "next_obs", "terminated", "mc_return")})
    assert len(buffer) == 4 and buffer.ring.written == 5
    assert all(torch.equal(before[k], buffer.ring.frames[k]) for k in before)
    assert_own_images(buffer.sample(64))


def test_state_buffers_are_unchanged_and_batches_have_no_images():
    buffer = TransitionBuffer(2, ACT, capacity=5, device="cpu")
    rows = segment_rows([(0, 0, 7)])
    buffer.add(**{k: rows[k] for k in ("obs", "action", "reward", "next_obs", "terminated", "mc_return")})
    assert len(buffer) == 5 and buffer.ring is None and buffer.memory.frames == 0
    batch = buffer.sample(8)
    assert batch.images == {} and batch.next_images == {}
    assert set(batch.obs[:, 1].tolist()) <= {2.0, 3.0, 4.0, 5.0, 6.0}
    with pytest.raises(ValueError, match="with frames for a buffer without cameras"):
        add(buffer, rows)


def test_offline_dataset_frames_load_and_concat_with_online_batches():
    # A Minari-style camera dataset (datasets/minari_io.py Transitions): each episode of T steps keeps
    # T + 1 frames; episodes of 3 and 1 steps.
    rows = segment_rows([(0, 0, 3), (1, 0, 1)])
    frames = {k[len("frames/"):]: v for k, v in rows.items() if k.startswith("frames/")}
    data = Transitions(rows["obs"], rows["action"], rows["reward"], rows["next_obs"], rows["terminated"].astype(np.float32),
                       rows["terminated"], rows["mc_return"], frames=frames, obs_frame=rows["obs_frame"],
                       next_frame=rows["next_frame"])  # fmt: skip
    low, high = -np.ones(ACT, np.float32), np.ones(ACT, np.float32)
    offline = TransitionBuffer.from_transitions(data, low, high, "cpu")
    assert len(offline) == 4 and offline.ring.capacity == 6  # every frame of the dataset, once
    assert offline.ring.frames["front"].data_ptr() == frames["front"].ctypes.data  # the dataset's own (no copy)
    assert offline.cameras == CAMS
    assert_own_images(offline.sample(64))

    online = TransitionBuffer(SPEC, ACT, capacity=20, device="cpu", online=True)
    add(online, segment_rows([(7, 0, 5)]))
    batch = mixed_batch(offline, online, 32, offline_ratio=0.25)
    assert batch.online_rows == 24 and batch.images["front"].shape == (32, 3, 2, 3)
    assert_own_images(batch)
    assert set(batch.obs[:8, 0].tolist()) <= {0.0, 1.0} and set(batch.obs[8:, 0].tolist()) == {7.0}
    state = Batch(*(torch.zeros(2, 2) for _ in range(6)))
    with pytest.raises(ValueError, match="cameras"):
        concat_batches(state, online.sample(2))


def test_a_dataset_with_frames_in_another_order_loads_without_touching_its_arrays():
    rows = segment_rows([(0, 0, 3), (1, 0, 2)])
    count = len(rows["frames/front"])
    frames = {c.name: rows[f"frames/{c.name}"][::-1].copy() for c in CAMS}  # stored last frame first
    before = {name: f.copy() for name, f in frames.items()}
    data = Transitions(rows["obs"], rows["action"], rows["reward"], rows["next_obs"], rows["terminated"].astype(np.float32),
                       rows["terminated"], rows["mc_return"], frames=frames, obs_frame=count - 1 - rows["obs_frame"],
                       next_frame=count - 1 - rows["next_frame"])  # fmt: skip
    buffer = TransitionBuffer.from_transitions(data, -np.ones(ACT), np.ones(ACT), "cpu")
    assert_own_images(buffer.sample(64))
    assert all(np.array_equal(frames[name], before[name]) for name in frames)  # re-laid in a copy, not in place


def test_online_data_takes_commit_rows_with_their_frames_and_drops_eval_rows():
    buffer = TransitionBuffer(SPEC, ACT, capacity=100, device="cpu", online=True)
    data = OnlineData(buffer, -np.ones(ACT, np.float32), np.ones(ACT, np.float32), DataSettings(0.9, 1.0, 0.0))
    closed = segment_rows([(0, 0, 3), (1, 0, 2), (2, 0, 4)])
    closed["eval"][3:5] = True  # episode 1 was an evaluation episode: its rows (and frames) are not kept
    event = CommitEvent(start=0, stop=9, episodes={}, closed=closed)
    data.on_commit(event)
    assert data.drain() == 7 and len(buffer) == 7
    assert buffer.ring.written == 9  # the 4 + 5 frames the kept rows use, each once; none of episode 1's
    assert sampled_ids(buffer) == {(0, s) for s in range(3)} | {(2, s) for s in range(4)}


def test_memory_figure_by_hand():
    buffer = TransitionBuffer(ObsSpec(2, (CameraSpec("maze_top", 84, 84, 3),)), 2, capacity=1000, device="cpu")
    memory = buffer.memory
    assert buffer.ring.capacity == default_frame_capacity(1000) == 1250
    # Rows: obs 2 + next_obs 2 + action 2 + reward, terminated, mc_return = 9 float32 = 36 bytes each.
    assert memory.row_bytes == 1000 * 36 == 36_000
    # Frames: 1250 x 84*84*3 uint8, plus two int64 frame indices per row.
    assert memory.frame_bytes == 1250 * 21_168 + 1000 * 16 == 26_476_000
    assert sum(r.nbytes for r in buffer.ring.frames.values()) + buffer.ring.obs_frame.nbytes * 2 == memory.frame_bytes
    assert memory.line() == ("1,000 transitions (35.2 KiB on cpu) + 1,250 frames per camera (25.2 MiB on cpu): "
                             "25.3 MiB in all")  # fmt: skip


def store_chunk(actor: str, seq: int, parts: list[tuple[int, int, int]], last_open=False, eval=False) -> TransitionChunk:
    """A wire chunk of one actor (episode slices as in ``segment_rows``) for a real camera store."""
    rows = segment_rows(parts, last_open)
    flags = np.zeros(len(rows["reward"]), np.uint8)
    return TransitionChunk(
        actor_id=actor, seq=seq, policy_version=1, episode_id=parts[0][0], step=parts[0][1], obs=rows["obs"],
        action=rows["action"], reward=rows["reward"], next_obs=rows["next_obs"],
        terminated=rows["terminated"].astype(np.uint8),
        truncated=flags, success=flags, eval=eval, frames={c.name: rows[f"frames/{c.name}"] for c in CAMS},
    )  # fmt: skip


def fill_store(path) -> list[tuple[int, int]]:
    """Interleaved chunks of three actors (episodes cut across chunks, 1-step ones, an eval episode, an
    open one) in a real camera store; returns the trainable rows' (episode, step) in store order."""
    store = ReplayStore.create(path, SPEC, ACT, data=DataSettings(0.9, 1.0, 0.0))
    # a: episodes 0 (7 steps over 2 chunks), 1 (1 step), 2 (still open); b: 50 (1 step), 51 (2 steps),
    # 52 (5 steps over 2 chunks); c: the eval episode 60.
    store.append(store_chunk("a", 0, [(0, 0, 4)], last_open=True))
    store.append(store_chunk("b", 0, [(50, 0, 1), (51, 0, 2)]))
    store.append(store_chunk("c", 0, [(60, 0, 3)], eval=True))
    store.append(store_chunk("a", 1, [(0, 4, 3), (1, 0, 1), (2, 0, 2)], last_open=True))  # its first frame: a's last one
    store.append(store_chunk("b", 1, [(52, 0, 3)], last_open=True))
    store.commit()
    store.append(store_chunk("b", 2, [(52, 3, 2)]))
    store.commit()
    store.close()
    return ([(0, s) for s in range(4)] + [(50, 0), (51, 0), (51, 1)] + [(0, s) for s in range(4, 7)] + [(1, 0)]
            + [(52, s) for s in range(5)])  # fmt: skip


def test_restart_loads_the_stores_last_image_rows_in_bounded_reads(tmp_path):
    """A restarted learner reloads the store's last trainable rows with their frames, reading frames
    only for the rows its buffer keeps, a bounded number of rows at a time (3 here)."""
    trainable = fill_store(tmp_path / "replay")
    reads = []

    class Recording(ReplayStore):
        def read(self, start=0, stop=None, columns=None, **kwargs):
            rows = super().read(start, stop, columns, **kwargs)
            reads.append((len(rows["obs_frame"]) if "obs_frame" in rows else 0, len(rows.get("frames/front", ()))))
            return rows

    store = Recording.open(tmp_path / "replay", "r")
    # Room for 3 frames per row: each read brings the frames its rows use, so an episode cut across
    # reads brings its boundary frame twice (reads of a few thousand rows in practice, 3 here).
    buffer = TransitionBuffer(SPEC, ACT, capacity=10, device="cpu", online=True, frame_capacity=30)
    data = OnlineData(buffer, -np.ones(ACT, np.float32), np.ones(ACT, np.float32), DataSettings(0.9, 1.0, 0.0))
    assert data.load_store(store, chunk=3) == len(trainable) == 16
    assert len(buffer) == 10 and sampled_ids(buffer) == set(trainable[-10:])
    with_frames = [r for r in reads if r[0]]
    assert with_frames and max(rows for rows, _ in with_frames) <= 3 and max(f for _, f in with_frames) <= 6
    assert sum(rows for rows, _ in with_frames) == 10  # no frames read for the 6 older rows


def test_retrain_reads_the_stores_image_rows_with_their_frames(tmp_path):
    trainable = fill_store(tmp_path / "replay")
    selection = select_store_rows(ReplayStore.open(tmp_path / "replay", "r"))
    data = selection.transitions
    assert [tuple(map(int, o)) for o in data.obs] == trainable
    # Each frame once, also for an episode cut across chunks with another actor's rows between them
    # (a's episode 0): 16 rows of 5 episodes (0, 50, 51, 1, 52), T + 1 frames each = 21.
    assert {name: len(f) for name, f in data.frames.items()} == {"front": 21, "wrist": 21}
    buffer = TransitionBuffer.from_transitions(data, -np.ones(ACT), np.ones(ACT), "cpu")
    assert len(buffer) == 16 and buffer.ring.capacity == 21
    assert sampled_ids(buffer) == set(trainable)
    assert_own_images(buffer.sample_rows(torch.tensor([0, 15]), 16))


def test_the_learner_refuses_a_store_made_for_other_observations(tmp_path):
    ReplayStore.create(tmp_path / "replay", SPEC, ACT, fsync=False).close()
    with pytest.raises(StoreError, match="holds observations"):
        open_store(tmp_path / "replay", "t", DataSettings(), fsync=False, abandon_idle_s=None, obs_spec=ObsSpec(2))
    store = open_store(tmp_path / "replay", "t", DataSettings(), fsync=False, abandon_idle_s=None, obs_spec=SPEC)
    assert store.config.cameras == CAMS
    store.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (frames on the GPU, or moved per batch)")
@pytest.mark.parametrize("frames_on", ["auto", "host"])
def test_gpu_buffer_keeps_frames_on_the_device_or_moves_them_per_batch(frames_on):
    buffer = TransitionBuffer(SPEC, ACT, capacity=50, device="cuda", frame_capacity=57, frames_on=frames_on)
    assert buffer.ring.device.type == ("cuda" if frames_on == "auto" else "cpu")
    assert buffer.memory.frames_device == str(buffer.ring.device)
    for e in range(30):
        add(buffer, segment_rows([(e, 0, 1 + e % 4)]))
    batch = buffer.sample(512)
    assert batch.obs.device.type == "cuda" and batch.images["front"].device.type == "cuda"
    assert_own_images(batch)
    best = torch.arange(len(buffer), device="cuda")[:3] + buffer._first % 50
    assert_own_images(buffer.sample_rows(best % 50, 64))
