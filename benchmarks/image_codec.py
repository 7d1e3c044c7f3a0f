"""The replay store's image codec, chosen by measurement: bytes per frame and commit throughput.

Run from the repository root:

    python -m benchmarks.image_codec              # writes the 'image_codec' section of BENCHMARKS.md
    python -m benchmarks.image_codec --no-write   # print only

Two kinds of 84x84x3 frames, the same rows (actions, rewards, episode ends) under both:

* maze: ``pointmaze-umaze-pixels`` (envs/maze_camera.py) driven by random actions, episodes of up
  to 300 steps: a flat-coloured top view (walls, ball, goal), the pixel task o2o trains on;
* texture: a camera-like image made here: smooth colour gradients and a low-frequency texture
  that drift a little each step (the camera moves), plus Gaussian sensor noise (sigma 3 grey
  levels) on every pixel of every frame. Noise is what makes real camera frames compress poorly.

For each candidate codec zarr offers here (``none``, zstd levels 1 and 3, blosc lz4 / zstd with
byte shuffle) one process appends 30-row chunks (1 s of a 30 Hz robot) of 1 actor, or of 8
actors interleaved (each its own episodes), to a real camera ``ReplayStore`` under the repository's
``.bench/`` (the repository's disk, not a tmpfs), committing with fsync on (the default) every 150
frames (what the ingest server's 50 ms group commit gathers at 3,000 frames/s). The default codec
also every 600 frames, and with a state store's row chunks (262,144 rows, not a camera store's 4,096).

frames/s: frames committed per second of append + commit (wall); CPU: the process's CPU time per
frame (zarr's codec threads included; less disturbed by other jobs than wall time); bytes per
frame: the frames columns' chunk bytes / frames stored; store bytes per transition: every chunk of
the store (rows, episodes, frames; not the fixed ~21 KB of metadata files) / rows, against one
compressed frame set (the issue's target: at most 1.1x). Settings run interleaved; each figure is
the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.rows import TransitionChunk, frame_layout
from o2o.datasets.store_frames import CAMERA_CHUNK_ROWS, DEFAULT_FRAME_COMPRESSOR
from o2o.envs.obs_spec import ObsSpec

ROOT = Path(__file__).resolve().parent.parent
TASK = "pointmaze-umaze-pixels"
WIRE_ROWS, COMMIT_FRAMES, LARGE_COMMIT_FRAMES = 30, 150, 600
STATE_CHUNK_ROWS = 262_144  # a state store's row chunks for a 2-float state (~2 MiB of obs)
RESULTS = ROOT / ".bench" / "image_codec.json"  # the last run's figures (``--render-only`` rewrites from them)
CODECS = {
    "none": None,
    "zstd-1": ZstdCodec(level=1),
    "zstd-3": ZstdCodec(level=3),
    "blosc-lz4 shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd shuffle": BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
}
# (codec, frames per commit, rows per row chunk; 0: the camera store's default)
SETTINGS = [(name, COMMIT_FRAMES, 0) for name in CODECS]
SETTINGS += [("zstd-1", LARGE_COMMIT_FRAMES, 0), ("zstd-1", COMMIT_FRAMES, STATE_CHUNK_ROWS)]


def maze_episodes(n_frames: int, seed: int = 0) -> list[dict]:
    """Episodes of random actions on the pixel maze until ``n_frames`` frames: states, actions,
    rewards, end flags and the T + 1 frames of each."""
    from o2o.envs import make_env
    from o2o.envs.maze_camera import MazeTopCamera

    env = MazeTopCamera(make_env("pointmaze-umaze", flatten=False), size=84)  # the targets' 84x84 (the task: 48)
    env.action_space.seed(seed)
    episodes, total = [], 0
    while total < n_frames:
        obs, _ = env.reset(seed=seed + len(episodes))
        states, frames, actions, rewards, terminated, truncated = [obs["state"]], [obs["top"]], [], [], [], []
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, term, trunc, _ = env.step(action)
            states.append(obs["state"])
            frames.append(obs["top"])
            actions.append(action)
            rewards.append(reward)
            terminated.append(term)
            truncated.append(trunc)
            done = term or trunc
        total += len(frames)
        episodes.append({"state": np.array(states, np.float32), "frames": np.array(frames),
                         "action": np.array(actions, np.float32), "reward": np.array(rewards, np.float32),
                         "terminated": np.array(terminated), "truncated": np.array(truncated)})  # fmt: skip
    env.close()
    return episodes


def textured(episodes: list[dict], seed: int = 0) -> list[dict]:
    """The same episodes with camera-like frames: drifting gradients and texture, sensor noise."""
    rng = np.random.default_rng(seed)
    size = 84
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    coarse = rng.uniform(0, 1, (12, 12, 3)).astype(np.float32)  # a low-frequency texture, upsampled
    texture = np.kron(coarse, np.ones((7, 7, 1), np.float32))
    out = []
    for ep in episodes:
        frames = np.empty_like(ep["frames"])
        for t in range(len(frames)):
            shift = 0.01 * t
            base = np.stack([60 + 80 * (x + shift) % 1, 90 + 60 * y, 120 + 50 * np.sin(6 * (x + y + shift))], -1)
            image = base + 50 * np.roll(texture, t // 3, axis=1) + rng.normal(0, 3, (size, size, 3))
            frames[t] = np.clip(image, 0, 255).astype(np.uint8)
        out.append({**ep, "frames": frames})
    return out


def chunks_of(episodes: list[dict], actor: str) -> list[TransitionChunk]:
    """One actor's 30-row chunks (episodes back to back), frames in the wire's segment layout."""
    rows = {k: np.concatenate([ep[k] for ep in episodes]) for k in ("action", "reward", "terminated", "truncated")}
    state = np.concatenate([ep["state"][:-1] for ep in episodes])
    next_state = np.concatenate([ep["state"][1:] for ep in episodes])
    # Global frame of each row's observation: episode e's frames follow the earlier ones.
    first = np.cumsum([0] + [len(ep["frames"]) for ep in episodes[:-1]])
    obs_frame = np.concatenate([start + np.arange(len(ep["reward"])) for start, ep in zip(first, episodes)])
    frames = np.concatenate([ep["frames"] for ep in episodes])
    episode_id = np.concatenate([np.full(len(ep["reward"]), i) for i, ep in enumerate(episodes)])
    step = np.concatenate([np.arange(len(ep["reward"])) for ep in episodes])
    chunks = []
    for seq, a in enumerate(range(0, len(state), WIRE_ROWS)):
        b = min(a + WIRE_ROWS, len(state))
        term, trunc = rows["terminated"][a:b], rows["truncated"][a:b]
        local, n_frames = frame_layout(term, trunc)
        index = np.empty(n_frames, np.int64)
        index[local], index[local + 1] = obs_frame[a:b], obs_frame[a:b] + 1
        chunks.append(TransitionChunk(
            actor_id=actor, seq=seq, policy_version=0, episode_id=int(episode_id[a]), step=int(step[a]),
            obs=state[a:b], action=rows["action"][a:b], reward=rows["reward"][a:b], next_obs=next_state[a:b],
            terminated=term.astype(np.uint8), truncated=trunc.astype(np.uint8), success=np.zeros(b - a, np.uint8),
            frames={"top": frames[index]},
        ))  # fmt: skip
    return chunks


def chunk_bytes(folder: Path) -> int:
    """Bytes of the Zarr chunk files under ``folder`` (not the arrays' metadata, not commit.json)."""
    return sum(p.stat().st_size for p in folder.rglob("c/**/*") if p.is_file())


def run_once(folder: Path, spec: ObsSpec, streams: list[list[TransitionChunk]], codec, commit_frames: int,
             chunk_rows: int) -> dict:  # fmt: skip
    path = folder / "replay"
    store = ReplayStore.create(path, spec, 2, frame_compressor=codec, task=TASK, chunk_rows=chunk_rows)
    staged = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(max(map(len, streams))):
        for chunks in streams:  # the actors' chunks interleave, as the ingest server receives them
            if i < len(chunks):
                store.append(chunks[i])
                staged += sum(len(f) for f in chunks[i].frames.values())
        if staged >= commit_frames:
            store.commit()
            staged = 0
    store.commit()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rows = len(store)
    store.close()
    frames = json.loads((path / "commit.json").read_text())["frames"]
    frame_bytes, store_bytes = chunk_bytes(path / "frames"), chunk_bytes(path)
    metadata = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) - store_bytes
    result = {"frames_per_s": frames / elapsed, "cpu_us": 1e6 * cpu / frames, "bytes_per_frame": frame_bytes / frames,
              "store_per_row": store_bytes / rows, "frames": frames, "rows": rows, "metadata": metadata}  # fmt: skip
    result["ratio"] = result["store_per_row"] / result["bytes_per_frame"]
    shutil.rmtree(path)
    return result


def measure(frames: int, repeat: int, counts: list[int]) -> dict:
    """Run every setting; returns what ``render`` needs (also saved to ``RESULTS``)."""
    load_before = os.getloadavg()[0]
    from o2o.envs import make_env
    from o2o.envs.maze_camera import MazeTopCamera

    env = MazeTopCamera(make_env("pointmaze-umaze", flatten=False), size=84)  # the targets' 84x84 (the task: 48)
    spec = ObsSpec.from_space(env.observation_space)
    env.close()
    maze = [maze_episodes(frames, seed=1000 * i) for i in range(max(counts))]  # each actor its own
    kinds = {"maze": maze, "texture": [textured(episodes, seed=i) for i, episodes in enumerate(maze)]}
    (ROOT / ".bench").mkdir(exist_ok=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="image-codec-", dir=ROOT / ".bench") as tmp:
        for kind, per_actor in kinds.items():
            for n in counts:
                streams = [chunks_of(per_actor[i], f"actor-{i}") for i in range(n)]
                for r in range(repeat):
                    for name, every, rows in SETTINGS if r % 2 == 0 else reversed(SETTINGS):
                        out = run_once(Path(tmp), spec, streams, CODECS[name], every, rows)
                        runs.append({"key": [kind, name, every, rows, n], **out})
                        print(f"{kind:8s} {name:19s} commit {every:4d} rows/chunk {rows or CAMERA_CHUNK_ROWS:6d} {n} actors: "
                              f"{out['frames_per_s']:7,.0f} frames/s {out['cpu_us']:5.0f} us CPU/frame "
                              f"{out['bytes_per_frame']:8,.0f} B/frame, store {out['store_per_row']:8,.0f} B/row "
                              f"({out['ratio']:.2f}x)", flush=True)  # fmt: skip
    done = {"frames": frames, "repeat": repeat, "counts": counts, "image_bytes": spec.image_bytes, "runs": runs,
            "load": [load_before, os.getloadavg()[0]]}  # fmt: skip
    RESULTS.write_text(json.dumps(done))
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2400, help="frames per actor and run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per codec, image kind and actor count")
    parser.add_argument("--actors", default="1,8", help="comma-separated actor counts")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help=f"no runs: write the section from {RESULTS.name}")
    args = parser.parse_args(argv)
    if args.render_only:
        done = json.loads(RESULTS.read_text())
    else:
        done = measure(args.frames, args.repeat, [int(a) for a in args.actors.split(",")])
    render(done, write=not args.no_write)


def render(done: dict, write: bool) -> None:
    """The table (printed) and, if ``write``, the 'image_codec' section of BENCHMARKS.md."""
    counts, image_bytes, kinds = done["counts"], done["image_bytes"], ("maze", "texture")
    load_before, load_after = done["load"]
    results: dict[tuple, list[dict]] = {}
    for run in done["runs"]:
        results.setdefault(tuple(run["key"]), []).append(run)
    figures = [k for k in done["runs"][0] if k != "key"]
    med = {key: {k: statistics.median(r[k] for r in runs) for k in figures} for key, runs in results.items()}
    lines = []
    for kind in kinds:
        for name, every, rows in SETTINGS:
            one, most = med[(kind, name, every, rows, counts[0])], med[(kind, name, every, rows, counts[-1])]
            rates = " | ".join(f"{med[(kind, name, every, rows, n)]['frames_per_s']:,.0f}" for n in counts)
            label = name + (" **(default)**" if CODECS[name] == DEFAULT_FRAME_COMPRESSOR else "")
            lines.append(f"| {kind} | {label} | {every} | {rows or CAMERA_CHUNK_ROWS:,} | {most['bytes_per_frame']:,.0f} "
                         f"| {100 * most['bytes_per_frame'] / image_bytes:.1f}% | {rates} | {one['cpu_us']:.0f} "
                         f"| {most['store_per_row']:,.0f} | {most['ratio']:.2f}x |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if not write:
        return
    from benchmarks.report import machine_line, write_section

    def fig(kind: str, name: str, key: str, every: int = COMMIT_FRAMES, rows: int = 0, n: int = counts[-1]) -> float:
        return med[(kind, name, every, rows, n)][key]

    note = med[("maze", "zstd-1", COMMIT_FRAMES, 0, counts[-1])]
    one = counts[0]
    v = {
        "maze_z1": fig("maze", "zstd-1", "bytes_per_frame"),
        "lz4_x": fig("maze", "blosc-lz4 shuffle", "bytes_per_frame") / fig("maze", "zstd-1", "bytes_per_frame"),
        "tex_pct": fig("texture", "zstd-1", "bytes_per_frame") / image_bytes,
        "cpu_maze_z1": fig("maze", "zstd-1", "cpu_us", n=one),
        "cpu": ", ".join(f"{c} {fig('maze', c, 'cpu_us', n=one):.0f} / {fig('texture', c, 'cpu_us', n=one):.0f} us"
                         for c in CODECS),
        "z1_vs_none": " / ".join(f"{fig(k, 'zstd-1', 'cpu_us', n=one) - fig(k, 'none', 'cpu_us', n=one):+.0f}" for k in kinds)
        + " us",
        "z1_maze_1": fig("maze", "zstd-1", "frames_per_s", n=one),
        "z1_tex_1": fig("texture", "zstd-1", "frames_per_s", n=one),
        "large_lo_1": min(fig(k, "zstd-1", "frames_per_s", every=LARGE_COMMIT_FRAMES, n=one) for k in kinds),
        "large_hi_1": max(fig(k, "zstd-1", "frames_per_s", every=LARGE_COMMIT_FRAMES, n=one) for k in kinds),
        "large_lo": min(fig(k, "zstd-1", "frames_per_s", every=LARGE_COMMIT_FRAMES) for k in kinds),
        "large_hi": max(fig(k, "zstd-1", "frames_per_s", every=LARGE_COMMIT_FRAMES) for k in kinds),
        "cpu_state_rows": fig("maze", "zstd-1", "cpu_us", rows=STATE_CHUNK_ROWS, n=one),
        "tex_ratio": fig("texture", "zstd-1", "ratio"), "maze_ratio": fig("maze", "zstd-1", "ratio"),
        "row_rest": fig("maze", "zstd-1", "store_per_row") - fig("maze", "zstd-1", "bytes_per_frame"),
    }  # fmt: skip
    rate_heads = " | ".join(f"frames/s, {n} actor{'s' if n > 1 else ''}" for n in counts)
    write_section(
        "image_codec",
        f"""
## Image codec of the replay store (`python -m benchmarks.image_codec`)

84x84x3 frames, {done['frames']:,} per actor and run (random-action episodes of `{TASK}` drawn at 84x84, up to 300 steps; each
actor its own), in two kinds: **maze**, the task's own top view (flat colours), and **texture**, a
camera-like image made by the benchmark (smooth colour gradients and a coarse texture drifting each
step, Gaussian sensor noise sigma 3 on every pixel). A real camera `ReplayStore` (64 frames per Zarr
chunk, {CAMERA_CHUNK_ROWS:,} rows per row chunk) under the repository's `.bench/` (ext4, not a tmpfs); 30-row chunks
(1 s at 30 Hz) of 1 or {counts[-1]} actors interleaved; a commit with **fsync on** every 150 frames (what the
ingest server's 50 ms group commit gathers at 3,000 frames/s); the default codec also every 600, and with
a state store's row chunks. Settings interleaved, medians of {done['repeat']} runs. Machine: {machine_line()};
load average {load_before:.1f} before, {load_after:.1f} after (other jobs shared the 2 cores: wall-clock
rates are noisy, CPU per frame less so).

bytes/frame: the frames column's chunk files / frames stored (each frame once: {note['frames'] / note['rows']:.3f}
frames per row here, the extra being each episode's final next frame). store B/row: every chunk file of
the store (rows, episodes, frames) / rows; x frame: that over bytes/frame, the issue's "store bytes per
transition vs one compressed frame set" (target at most 1.1x). Both with {counts[-1]} actors' rows
({note['rows']:,.0f}); the store's metadata files add a fixed {note['metadata'] / 1e3:,.0f} KB. CPU: process CPU
time per frame, 1 actor.

| image | codec | frames per commit | rows per row chunk | bytes/frame | of raw | {rate_heads} | CPU us/frame | store B/row | x frame |
|---|---|---|---|---|---|{'---|' * len(counts)}---|---|---|
{table}

**Picked: zstd-1** (`store_frames.DEFAULT_FRAME_COMPRESSOR`). It stores a maze frame in {v['maze_z1']:,.0f} B,
{v['lz4_x']:.0f}x fewer than blosc-lz4 (zstd on a whole chunk sees across its 64 frames, which barely change;
blosc compresses its blocks apart, and byte shuffle does nothing to one-byte pixels); level 3 and
blosc-zstd store about as much. On the noisy texture every codec keeps {v['tex_pct']:.0%}-100% of the raw bytes.
CPU per frame, 1 actor, maze / texture: {v['cpu']}; zstd-1 minus no codec: {v['z1_vs_none']}.
With 1 actor and a commit per 150 frames zstd-1 commits {v['z1_maze_1']:,.0f} (maze) and {v['z1_tex_1']:,.0f} (texture)
frames/s here (the issue's ingest target: 3,000); the ingest server's group commit makes commits larger
when one takes longer than its 50 ms interval, and at 600 frames per commit zstd-1 commits
{v['large_lo_1']:,.0f}-{v['large_hi_1']:,.0f} frames/s with 1 actor, {v['large_lo']:,.0f}-{v['large_hi']:,.0f} with {counts[-1]}.
A camera store's rows go in {CAMERA_CHUNK_ROWS:,}-row chunks: with a state store's 262,144-row chunks each commit
rewrites ~2 MiB of every row column ({v['cpu_state_rows']:.0f} vs {v['cpu_maze_z1']:.0f} us CPU per maze frame).

The 1.1x target: met by the texture ({v['tex_ratio']:.2f}x), not by the maze ({v['maze_ratio']:.2f}x): its frame
compresses to fewer bytes than the rest of its row (state, action, reward, next state, flags, the two
frame indices: {v['row_rest']:.0f} B), so no frame codec brings it under 1.1x. The frames themselves are stored
{note['frames'] / note['rows']:.3f} times per row (keeping each row's observation and next observation would be 2).
""",
    )
    print("wrote the 'image_codec' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
