"""Learner memory while a fleet streams rows: this tree's ``OnlineData`` vs the host-mirror one.

Run from the repository root:

    python -m benchmarks.learner_memory                 # 1M and 5M rows, writes BENCHMARKS.md
    python -m benchmarks.learner_memory --rows 200000,1000000 --no-write

Each side runs in its own process (RSS is per process): synthetic Pusher-sized chunks
(obs 23, action 7; 250-row chunks of 4 actors, 100-step truncated episodes, random-walk
observations) are appended to a real ``ReplayStore`` on /tmp, committed at each full
Zarr chunk (as ``IngestServer`` groups commits), and each commit event goes through
``OnlineData.on_commit`` + ``drain`` into a CPU ``TransitionBuffer`` of 1M rows. At each
mark the process's VmRSS and VmHWM (peak) from /proc/self/status are reported next to
the buffer's own bytes. The other side is ``learner/online_data.py`` of ``--old`` (git
show, loaded as a temporary module): its ``HostMirror`` kept a copy of every committed row.
The store folder is deleted afterwards.

Image mode (``--images``): the same with ``pointmaze-umaze-pixels`` rows (one 48x48x3 camera, the
frames rendered by the task's own camera from random-action episodes) into an image
``TransitionBuffer`` (uint8 frames on the host) of ``--capacity`` transitions, with marks at 1x to 10x
the capacity; then a restarted learner (a fresh process) reloads the store at 1x and at 10x
(``OnlineData.load_store``): its peak RSS must not grow with the store (the read path reads frames
only for the rows the buffer keeps, a few hundred MiB at a time).

    python -m benchmarks.learner_memory --images --capacity 10000   # 1x..10x, writes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBS_DIM, ACT_DIM = 23, 7  # Pusher-v5
CHUNK_ROWS, EPISODE_LEN, ACTORS = 250, 100, 4  # chunks span episodes: some stay open across commits
OLD_REV = "2ae9cda"  # the last commit whose learner kept a host mirror of every committed row


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def load_online_data(side: str, rev: str):
    """This tree's ``o2o.learner.online_data``, or the one of ``rev`` as a temporary module."""
    if side == "new":
        from o2o.learner import online_data

        return online_data
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:learner/online_data.py"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    source = source.replace("from .buffer import", "from o2o.learner.buffer import")  # not in a package
    with tempfile.TemporaryDirectory(prefix="o2o-old-online-data-") as tmp:
        path = Path(tmp) / "old_online_data.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("old_online_data", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def child(side: str, rev: str, marks: list[int], capacity: int) -> None:
    """One side: ingest up to max(marks) rows, print one JSON line per mark."""
    import numpy as np

    from o2o.datasets.data_settings import DataSettings
    from o2o.datasets.replay_store import ReplayStore
    from o2o.learner.buffer import TransitionBuffer
    from o2o.transport import wire

    module = load_online_data(side, rev)
    start_rss = proc_status()["VmRSS"]
    rng = np.random.default_rng(0)
    pool = []  # a few chunks' arrays, reused (compression does not matter here, memory does)
    for _ in range(8):
        obs = np.cumsum(rng.normal(0, 0.02, (CHUNK_ROWS + 1, OBS_DIM)), axis=0).astype(np.float32)
        pool.append({
            "obs": obs[:-1], "next_obs": obs[1:],
            "action": np.tanh(rng.normal(size=(CHUNK_ROWS, ACT_DIM))).astype(np.float32),
            "reward": -np.linalg.norm(obs[1:, :3], axis=1).astype(np.float32),
            "terminated": np.zeros(CHUNK_ROWS, np.uint8),
            "success": np.zeros(CHUNK_ROWS, np.uint8),
        })  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="o2o-learner-memory-", dir="/tmp"))
    try:
        store = ReplayStore.create(folder / "replay", OBS_DIM, ACT_DIM)
        buffer = TransitionBuffer(OBS_DIM, ACT_DIM, capacity, "cpu")
        buffer_bytes = sum(t.nbytes for t in buffer.columns.values())
        low, high = -np.ones(ACT_DIM, np.float32), np.ones(ACT_DIM, np.float32)
        # The old revision's OnlineData took reward_scale, reward_bias; this tree's, the DataSettings.
        settings = (1.0, 0.0) if "reward_scale" in inspect.signature(module.OnlineData).parameters else (DataSettings(),)
        data = module.OnlineData(buffer, low, high, *settings)
        seqs = [0] * ACTORS
        rows, t0 = 0, time.perf_counter()
        for mark in sorted(marks):
            while rows < mark:
                for k in range(ACTORS):
                    seq = seqs[k]
                    g = seq * CHUNK_ROWS  # the actor's step count: episode and step of the chunk's first row
                    truncated = ((g + np.arange(CHUNK_ROWS)) % EPISODE_LEN == EPISODE_LEN - 1).astype(np.uint8)
                    store.append(wire.TransitionChunk(
                        actor_id=f"arm-{k}", seq=seq, policy_version=0, episode_id=g // EPISODE_LEN,
                        step=g % EPISODE_LEN, truncated=truncated, **pool[(seq + k) % len(pool)],
                    ))  # fmt: skip  (truncated: Pusher's time limit)
                    seqs[k] += 1
                    rows += CHUNK_ROWS
                if store.staged_full_chunk:  # the ingest server's group commit at a full Zarr chunk
                    store.commit(collect=True)
                    data.on_commit(store.last_commit)
                    data.drain()
                    data.pop_episodes()
            store.commit(collect=True)
            data.on_commit(store.last_commit)
            data.drain()
            mirror = getattr(data, "mirror", None)
            print(json.dumps({
                "side": side, "rows": rows, "committed": data.committed_rows, "trainable": data.trainable_rows,
                "capacity": capacity, "buffer_rows": len(buffer), "buffer_bytes": buffer_bytes, "start_rss": start_rss,
                "mirror_bytes": sum(c.nbytes for c in mirror.columns.values()) if mirror is not None else 0,
                "seconds": time.perf_counter() - t0, **proc_status(),
            }), flush=True)  # fmt: skip
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def report(results: list[dict], command: str, rev: str, load: tuple[float, float]) -> str:
    from benchmarks.report import machine_line

    lines = [
        f"## Learner memory: rows streamed through the store into a {results[0]['capacity']:,}-row buffer",
        "",
        f"`{command}` on {machine_line()}, CPU buffer (torch, no accelerator). Each side in its own process:",
        f"{ACTORS} actors' {CHUNK_ROWS}-row chunks (Pusher-sized: obs {OBS_DIM}, action {ACT_DIM}; "
        f"{EPISODE_LEN}-step truncated episodes) appended to a real `ReplayStore` on /tmp, committed at each",
        "full Zarr chunk, each commit event through `OnlineData.on_commit` + `drain` into a `TransitionBuffer`",
        f"of {results[0]['capacity']:,} rows. *old*: `learner/online_data.py` of {rev} (its `HostMirror` copied",
        "every committed row), loaded as a temporary module, with this tree's store. RSS: VmRSS at the mark;",
        "peak: VmHWM so far; 'start': RSS before the buffer and store existed (Python, numpy, torch, zarr).",
        "",
        "| side | rows ingested | RSS (MiB) | peak RSS (MiB) | RSS - start (MiB) | buffer (MiB) | host mirror (MiB) "
        "| trainable rows | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['side']} | {r['rows']:,} | {mb(r['VmRSS'])} | {mb(r['VmHWM'])} | {mb(r['VmRSS'] - r['start_rss'])} | "
            f"{mb(r['buffer_bytes'])} | {mb(r['mirror_bytes']) if r['side'] == 'old' else '-'} | {r['trainable']:,} | "
            f"{r['seconds']:.0f} |"
        )
    lines.append("")
    for side in dict.fromkeys(r["side"] for r in results):
        mine = [r for r in results if r["side"] == side]
        first, last = mine[0], mine[-1]
        lines.append(
            f"- {side}: RSS {'+' if last['VmRSS'] >= first['VmRSS'] else ''}{mb(last['VmRSS'] - first['VmRSS'])} MiB "
            f"from {first['rows']:,} to {last['rows']:,} rows "
            f"({(last['VmRSS'] - first['VmRSS']) / max(1, last['rows'] - first['rows']):.1f} bytes per row)."
        )
    lines += [
        "- The old mirror grows by doubling (its allocated size is shown; pages not yet written are not resident),",
        "  so a week of a fleet's rows ends out of memory; the new learner holds its buffer, the store's staged",
        "  chunks and the open episodes' rows, whatever the row count.",
        f"- Load average {load[0]:.1f} before, {load[1]:.1f} after (other jobs shared the machine); `s`: seconds",
        "  to that mark (store writes included), for orientation only.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- image mode

IMAGE_TASK = "pointmaze-umaze-pixels"
IMAGE_CHUNK_ROWS, IMAGE_EPISODE_LEN, IMAGE_COMMIT_ROWS = 50, 100, 2000  # a chunk: ~1.7 s at 30 Hz


def frame_pool(n: int = 512):
    """(spec, action_dim, {camera: n frames}) of ``IMAGE_TASK``'s camera, from random-action episodes."""
    import numpy as np

    from o2o.envs import get_task, make_env
    from o2o.envs.obs_spec import ObsSpec

    env = make_env(get_task(IMAGE_TASK))
    spec = ObsSpec.from_space(env.observation_space)
    pool = {c: [] for c in spec.camera_names}
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(n):
        for camera in pool:
            pool[camera].append(obs[camera])
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    action_dim = env.action_space.shape[0]
    env.close()
    return spec, action_dim, {camera: np.stack(frames) for camera, frames in pool.items()}


def image_chunk(actor: int, seq: int, pool: dict, spec, action_dim: int):
    """Chunk ``seq`` of actor ``actor``: truncated episodes of ``IMAGE_EPISODE_LEN`` steps, frames in the
    wire's segment layout; the frame of (episode, step) is always the same pool frame, so the store
    keeps a continuing episode's shared frame once."""
    import numpy as np

    from o2o.datasets.rows import TransitionChunk, frame_layout

    g = seq * IMAGE_CHUNK_ROWS + np.arange(IMAGE_CHUNK_ROWS)  # the actor's steps so far
    episode, step = g // IMAGE_EPISODE_LEN, g % IMAGE_EPISODE_LEN
    truncated = (step == IMAGE_EPISODE_LEN - 1).astype(np.uint8)
    obs_frame, count = frame_layout(np.zeros_like(truncated), truncated)
    frames = {}
    for camera, images in pool.items():
        which = lambda t: (episode * 7 + t + actor * 13) % len(images)  # noqa: E731
        frames[camera] = np.empty((count, *images.shape[1:]), np.uint8)
        frames[camera][obs_frame], frames[camera][obs_frame + 1] = images[which(step)], images[which(step + 1)]
    state = np.stack([np.sin(g / 10.0), np.cos(g / 10.0)], 1).astype(np.float32)[:, : spec.state_dim]
    zeros = np.zeros(IMAGE_CHUNK_ROWS, np.uint8)
    return TransitionChunk(
        actor_id=f"arm-{actor}", seq=seq, policy_version=0, episode_id=int(episode[0]), step=int(step[0]), obs=state,
        action=np.zeros((IMAGE_CHUNK_ROWS, action_dim), np.float32), reward=-np.ones(IMAGE_CHUNK_ROWS, np.float32),
        next_obs=state, terminated=zeros, truncated=truncated, success=zeros, frames=frames,
    )  # fmt: skip


def image_learner(spec, action_dim: int, capacity: int):
    import numpy as np

    from o2o.datasets.data_settings import DataSettings
    from o2o.learner.buffer import TransitionBuffer
    from o2o.learner.online_data import OnlineData

    buffer = TransitionBuffer(spec, action_dim, capacity, "cpu")
    low, high = -np.ones(action_dim, np.float32), np.ones(action_dim, np.float32)
    return buffer, OnlineData(buffer, low, high, DataSettings())


def child_images(marks: list[int], capacity: int, folder: Path) -> None:
    """Ingest up to max(marks) image rows through a real store into the learner; one JSON line per
    mark. The store at the first mark is copied to ``folder/first`` for the restart side."""
    from o2o.datasets.replay_store import ReplayStore

    start_rss = proc_status()["VmRSS"]
    spec, action_dim, pool = frame_pool()
    # fsync off: memory is measured here, not durability (benchmarks/store_fsync.py measures that).
    store = ReplayStore.create(folder / "replay", spec, action_dim, fsync=False)
    buffer, data = image_learner(spec, action_dim, capacity)
    memory = buffer.memory
    print(json.dumps({"log": f"buffer: {memory.line()}"}), flush=True)
    seqs, rows, staged, t0 = [0] * ACTORS, 0, 0, time.perf_counter()
    for mark in sorted(marks):
        while rows < mark:
            for k in range(ACTORS):
                store.append(image_chunk(k, seqs[k], pool, spec, action_dim))
                seqs[k] += 1
            rows, staged = rows + ACTORS * IMAGE_CHUNK_ROWS, staged + ACTORS * IMAGE_CHUNK_ROWS
            if staged >= IMAGE_COMMIT_ROWS:  # the ingest server's group commit
                store.commit(collect=True)
                data.on_commit(store.last_commit)
                data.drain()
                data.pop_episodes()
                staged = 0
        store.commit(collect=True)
        data.on_commit(store.last_commit)
        data.drain()
        if mark == min(marks):
            shutil.copytree(folder / "replay", folder / "first", ignore=shutil.ignore_patterns("writer.lock"))
        print(json.dumps({
            "side": "ingest", "rows": rows, "committed": data.committed_rows, "trainable": data.trainable_rows,
            "capacity": capacity, "buffer_rows": len(buffer), "buffer_bytes": memory.total_bytes,
            "start_rss": start_rss, "seconds": time.perf_counter() - t0, **proc_status(),
        }), flush=True)  # fmt: skip
    store.close()


def child_restart(store_path: Path, capacity: int) -> None:
    """A restarted learner: a fresh buffer filled from the store (``OnlineData.load_store``)."""
    from o2o.datasets.replay_store import ReplayStore
    from o2o.envs.obs_spec import ObsSpec

    start_rss = proc_status()["VmRSS"]
    store = ReplayStore.open(store_path, "r")
    spec = ObsSpec(store.config.obs_dim, store.config.cameras)
    buffer, data = image_learner(spec, store.config.action_dim, capacity)
    before = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    trainable = data.load_store(store)
    print(json.dumps({
        "side": "restart", "rows": len(store), "trainable": trainable, "capacity": capacity, "buffer_rows": len(buffer),
        "buffer_bytes": buffer.memory.total_bytes, "start_rss": start_rss, "with_buffer_rss": before,
        "seconds": time.perf_counter() - t0, **proc_status(),
    }), flush=True)  # fmt: skip


def image_report(results: list[dict], command: str, logs: list[str], load: tuple[float, float]) -> str:
    from benchmarks.report import machine_line

    capacity = results[0]["capacity"]
    ingest = [r for r in results if r["side"] == "ingest"]
    restart = [r for r in results if r["side"] == "restart"]
    lines = [
        f"## Learner memory with image rows: 1x to {ingest[-1]['rows'] // capacity}x a {capacity:,}-transition buffer",
        "",
        f"`{command}` on {machine_line()}, CPU buffer (torch, no accelerator), `{IMAGE_TASK}` rows (one 48x48x3",
        f"camera, frames from the task's camera): {ACTORS} actors' {IMAGE_CHUNK_ROWS}-row chunks, {IMAGE_EPISODE_LEN}-step",
        f"truncated episodes, appended to a real `ReplayStore` on /tmp (fsync off) and committed every {IMAGE_COMMIT_ROWS:,}",
        "rows; each commit event through `OnlineData.on_commit` + `drain` into the image `TransitionBuffer`",
        f"({'; '.join(logs)}). Then a fresh process reloads the store at 1x and at the last mark",
        "(`OnlineData.load_store`, a restarted learner). RSS: VmRSS at the mark; peak: VmHWM so far; 'start':",
        "RSS before the buffer and store existed.",
        "",
        "| side | store rows | RSS (MiB) | peak RSS (MiB) | RSS - start (MiB) | buffer (MiB) | buffer rows | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['side']} | {r['rows']:,} | {mb(r['VmRSS'])} | {mb(r['VmHWM'])} | {mb(r['VmRSS'] - r['start_rss'])} | "
            f"{mb(r['buffer_bytes'])} | {r['buffer_rows']:,} | {r['seconds']:.0f} |"
        )
    first, last = ingest[0], ingest[-1]
    lines += [
        "",
        f"- ingest: RSS {'+' if last['VmRSS'] >= first['VmRSS'] else ''}{mb(last['VmRSS'] - first['VmRSS'])} MiB from "
        f"{first['rows']:,} to {last['rows']:,} rows (the buffer's frames are allocated, and touched, at start).",
    ]
    if len(restart) == 2:
        a, b = restart
        lines.append(
            f"- restart: peak RSS {mb(a['VmHWM'])} MiB with {a['rows']:,} store rows, {mb(b['VmHWM'])} MiB with "
            f"{b['rows']:,}; above the buffer: {mb(a['VmHWM'] - a['with_buffer_rss'])} and "
            f"{mb(b['VmHWM'] - b['with_buffer_rss'])} MiB (one read of frames for the rows the buffer keeps)."
        )
    lines.append(f"- Load average {load[0]:.1f} before, {load[1]:.1f} after (other jobs shared the machine).")
    return "\n".join(lines)


def main_images(args) -> None:
    if args.child == "images":
        child_images([int(m) for m in args.rows.split(",")], args.capacity, Path(args.store))
        return
    if args.child == "restart":
        child_restart(Path(args.store), args.capacity)
        return
    marks = [args.capacity * k for k in (1, 2, 5, 10)]
    folder = Path(tempfile.mkdtemp(prefix="o2o-learner-memory-images-", dir="/tmp"))
    results, logs, load_before = [], [], os.getloadavg()[0]

    def run(*extra: str) -> None:
        done = subprocess.run([sys.executable, "-m", "benchmarks.learner_memory", "--capacity", str(args.capacity),
                               "--store", *extra], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"{extra} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                logs.append(record["log"]) if "log" in record else results.append(record)

    try:
        run(str(folder), "--child", "images", "--rows", ",".join(map(str, marks)))
        run(str(folder / "first"), "--child", "restart")
        run(str(folder / "replay"), "--child", "restart")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    command = f"python -m benchmarks.learner_memory --images --capacity {args.capacity}"
    text = image_report(results, command, logs, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        from benchmarks.report import write_section

        write_section("learner_memory_images", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,5000000", help="comma-separated marks (rows ingested)")
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--old", default=OLD_REV, help="the commit whose learner/online_data.py is 'old'")
    parser.add_argument("--sides", default="new,old")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--images", action="store_true", help="image rows (pointmaze-umaze-pixels), marks 1x..10x capacity")
    parser.add_argument("--child", choices=["new", "old", "images", "restart"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.images or args.child in ("images", "restart"):
        main_images(args)
        return
    marks = [int(m) for m in args.rows.split(",")]
    if args.child:
        child(args.child, args.old, marks, args.capacity)
        return
    results, load_before = [], os.getloadavg()[0]
    for side in args.sides.split(","):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.learner_memory", "--child", side, "--rows", args.rows,
             "--capacity", str(args.capacity), "--old", args.old],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"side {side} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        results += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    command = "python -m benchmarks.learner_memory" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:] if a != "--no-write"
    )
    text = report(results, command, args.old, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        from benchmarks.report import write_section

        write_section("learner_memory", text)


if __name__ == "__main__":
    main()
