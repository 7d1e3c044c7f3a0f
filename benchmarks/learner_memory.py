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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,5000000", help="comma-separated marks (rows ingested)")
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--old", default=OLD_REV, help="the commit whose learner/online_data.py is 'old'")
    parser.add_argument("--sides", default="new,old")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", choices=["new", "old"], help=argparse.SUPPRESS)
    args = parser.parse_args()
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
