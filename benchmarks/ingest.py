"""Ingest throughput: K actor processes -> ZeroMQ -> IngestServer -> committed Zarr store.

Run from the repository root:

    python -m benchmarks.ingest                # 2 senders, 1000-row chunks, writes BENCHMARKS.md
    python -m benchmarks.ingest --no-write     # print only

Measured in one run, with the same frames:
* raw ZeroMQ PUSH/PULL loopback (the anchor: what the transport alone carries);
* the store alone in one process (decode + append + commit, no sockets);
* the full path: DEALER actors with a window of unacked chunks -> ROUTER ->
  validate -> append -> group commit -> cumulative acks. Timed until every
  chunk of every actor is acked, i.e. committed. Then checks that nothing was
  lost or duplicated (row count, per-actor committed seq, data spot checks).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from zarr.codecs import BloscCodec, ZstdCodec

from o2o.transport import wire
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.zarr_table import DEFAULT_COMPRESSOR
from o2o.transport.ingest import IngestServer

SPAWN = mp.get_context("spawn")
TASK = "bench"


def make_arrays(rows: int, obs_dim: int, act_dim: int, seed: int) -> dict[str, np.ndarray]:
    """One episode of ``rows`` steps with smooth (random-walk) observations, like a robot's."""
    rng = np.random.default_rng(seed)
    obs = np.cumsum(rng.normal(0, 0.02, (rows + 1, obs_dim)), axis=0).astype(np.float32)
    terminated = np.zeros(rows, np.uint8)
    terminated[-1] = 1
    return {
        "obs": obs[:-1],
        "action": np.tanh(rng.normal(size=(rows, act_dim))).astype(np.float32),
        "reward": -np.linalg.norm(obs[1:, :3], axis=1).astype(np.float32),
        "next_obs": obs[1:],
        "terminated": terminated,
        "truncated": np.zeros(rows, np.uint8),
        "success": (rng.random(rows) < 0.1).astype(np.uint8),
    }


def episode_pool(rows: int, obs_dim: int, act_dim: int, seed: int, size: int = 8) -> list[dict[str, np.ndarray]]:
    return [make_arrays(rows, obs_dim, act_dim, seed * 1000 + i) for i in range(size)]


def chunk_frames(actor_id: str, seq: int, pool: list[dict]) -> list:
    """Chunk ``seq``: one whole episode (episode_id = seq), so the store computes MC returns per chunk.

    Observations are offset per chunk so no two chunks hold the same bytes (repeated
    data would flatter the compressor)."""
    arrays = dict(pool[seq % len(pool)])
    offset = np.float32(seq * 1e-3)
    arrays["obs"] = arrays["obs"] + offset
    arrays["next_obs"] = arrays["next_obs"] + offset
    chunk = wire.TransitionChunk(actor_id=actor_id, seq=seq, policy_version=0, episode_id=seq, step=0, **arrays)
    return wire.encode_chunk(chunk)


# ---------------------------------------------------------------- sender processes


def push_sender(endpoint: str, n_chunks: int, rows: int, dims: tuple[int, int], seed: int, go) -> None:
    pool = episode_pool(rows, *dims, seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    go.wait()
    for seq in range(n_chunks):
        sock.send_multipart(chunk_frames(f"push-{seed}", seq, pool), copy=False)
    sock.close(linger=-1)
    ctx.term()


def dealer_sender(endpoint: str, actor_id: str, n_chunks: int, rows: int, dims, window: int, seed: int, ready, go, out):
    """A minimal actor: hello, then chunks with at most ``window`` unacked; done when all are acked."""
    pool = episode_pool(rows, *dims, seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart(wire.encode(wire.Hello(actor_id, TASK, dims[0], dims[1], next_seq=0)))
    welcome = wire.decode(sock.recv_multipart())
    assert isinstance(welcome, wire.Welcome), welcome
    ready.put(actor_id)
    go.wait()
    acked, seq, other = -1, 0, 0
    while acked < n_chunks - 1:
        while seq < n_chunks and seq - acked <= window:
            sock.send_multipart(chunk_frames(actor_id, seq, pool), copy=False)
            seq += 1
        msg = wire.decode(sock.recv_multipart())
        if isinstance(msg, wire.Ack):
            acked = max(acked, msg.seq)
        else:
            other += 1  # a reject or resend would mean the benchmark is broken
    out.put({"actor_id": actor_id, "acked": acked, "unexpected_replies": other})
    sock.close()
    ctx.term()


# ---------------------------------------------------------------- measurements


def measure_push_pull(args) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    go = SPAWN.Event()
    dims = (args.obs_dim, args.act_dim)
    procs = [
        SPAWN.Process(target=push_sender, args=(f"tcp://127.0.0.1:{port}", args.chunks, args.rows, dims, k, go))
        for k in range(args.senders)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let the senders import and connect; timing starts at the first message
    go.set()
    total = args.senders * args.chunks
    sock.recv_multipart(copy=False)
    start = time.perf_counter()
    for _ in range(total - 1):
        sock.recv_multipart(copy=False)
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    sock.close()
    ctx.term()
    return (total - 1) * args.rows / elapsed


def measure_store_alone(args, path: Path, compressor=DEFAULT_COMPRESSOR) -> tuple[float, float]:
    """Rows/s and MB on disk of decode + append + commit in one process."""
    store = ReplayStore.create(path, args.obs_dim, args.act_dim, task=TASK, compressor=compressor)
    spec = wire.ChunkSpec(args.obs_dim, args.act_dim)
    pool = episode_pool(args.rows, args.obs_dim, args.act_dim, 0)
    frames = [[bytes(f) for f in chunk_frames("solo", seq, pool)] for seq in range(args.chunks)]
    start = time.perf_counter()
    for seq in range(args.chunks):
        store.append(wire.decode_chunk(frames[seq], spec))
        if store.staged_full_chunk or (args.commit_rows and store.staged_rows >= args.commit_rows):
            store.commit()
    store.commit()
    elapsed = time.perf_counter() - start
    store.close()
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return args.chunks * args.rows / elapsed, disk / 1e6


def run_senders(procs: list, ready, go, out, ready_s: float = 600, done_s: float = 900) -> tuple[list, float]:
    """Start the sender processes, wait until each is ready, release them together, and time until
    each has put its result: (results, seconds)."""
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=ready_s)
    start = time.perf_counter()
    go.set()
    results = [out.get(timeout=done_s) for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    return results, elapsed


def measure_ingest(args, path: Path) -> dict:
    # O2O_BENCH_FSYNC=0: no fsync, to compare with trees from before fsync existed (benchmarks.versus_commit).
    store = ReplayStore.create(path, args.obs_dim, args.act_dim, task=TASK,
                               fsync=os.environ.get("O2O_BENCH_FSYNC", "1") != "0")  # fmt: skip
    server = IngestServer(
        store, "tcp://127.0.0.1:*", commit_rows=args.commit_rows, commit_interval_s=args.commit_interval,
        max_rows_per_s=None,  # the throughput of the path, not of the learner's per-actor limit
    ).start()
    ready, out, go = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    dims = (args.obs_dim, args.act_dim)
    actor_ids = [f"actor-{k}" for k in range(args.senders)]
    procs = [
        SPAWN.Process(
            target=dealer_sender,
            args=(server.endpoint, actor_id, args.chunks, args.rows, dims, args.window, k, ready, go, out),
        )
        for k, actor_id in enumerate(actor_ids)
    ]
    results, elapsed = run_senders(procs, ready, go, out)
    stats = server.stats()
    server.stop()
    store.close()

    # Nothing lost, nothing duplicated.
    store = ReplayStore.open(path, "r")
    total = args.senders * args.chunks * args.rows
    problems = []
    if len(store) != total:
        problems.append(f"store holds {len(store)} rows, {total} were sent")
    for k, actor_id in enumerate(actor_ids):
        if store.committed_seq(actor_id) != args.chunks - 1:
            problems.append(f"{actor_id}: committed seq {store.committed_seq(actor_id)}, expected {args.chunks - 1}")
        s = stats["actors"][actor_id]
        if s["chunks"] != args.chunks or s["duplicates"] or s["rejected"] or s["out_of_order"]:
            problems.append(f"{actor_id}: {s}")
    if any(r["acked"] != args.chunks - 1 or r["unexpected_replies"] for r in results):
        problems.append(f"sender results: {results}")
    rows = store.read(0, len(store), ["obs", "actor", "episode_id", "mc_return"])
    for code, actor_id in enumerate(store.actor_ids):
        pool = episode_pool(args.rows, *dims, int(actor_id.split("-")[1]))
        mine = rows["obs"][rows["actor"] == code]
        for seq in (0, args.chunks // 2, args.chunks - 1):
            sent = chunk_frames(actor_id, seq, pool)[1]
            if not np.array_equal(mine[seq * args.rows : (seq + 1) * args.rows].ravel(), np.frombuffer(sent, np.float32)):
                problems.append(f"{actor_id}: chunk {seq} differs from what was sent")
    if not np.isfinite(rows["mc_return"]).all():
        problems.append("MC returns missing on ended episodes")
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "rows_per_s": total / elapsed,
        "elapsed": elapsed,
        "total": total,
        "commits": stats["commits"],
        "chunk_rows": store.config.chunk_rows,
        "disk_mb": disk / 1e6,
        "raw_mb": total * (4 * (2 * args.obs_dim + args.act_dim + 2) + 4 + 4 + 8 + 4 + 4) / 1e6,
        "problems": problems,
    }


CODECS = {
    "blosc lz4 + shuffle (default)": DEFAULT_COMPRESSOR,
    "blosc zstd-1 + shuffle": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "zstd-1": ZstdCodec(level=1),
    "none": None,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1000, help="rows per chunk")
    parser.add_argument("--chunks", type=int, default=500, help="chunks per sender")
    parser.add_argument("--window", type=int, default=32, help="unacked chunks per sender")
    parser.add_argument("--obs-dim", type=int, default=17)
    parser.add_argument("--act-dim", type=int, default=6)
    parser.add_argument("--commit-rows", type=int, default=None, help="default: at Zarr chunk boundaries")
    parser.add_argument("--commit-interval", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.ingest", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    load_before = os.getloadavg()[0]

    raws, alones, fulls, codecs = [], [], [], {name: [] for name in CODECS}
    for run in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="o2o-bench-ingest-") as tmp:
            raws.append(measure_push_pull(args))
            for i, (name, codec) in enumerate(CODECS.items()):
                codecs[name].append(measure_store_alone(args, Path(tmp) / f"alone-{i}", codec))
            alones.append(codecs[next(iter(CODECS))][-1][0])
            fulls.append(measure_ingest(args, Path(tmp) / "ingest"))
        print(f"run {run + 1}: raw ZeroMQ {raws[-1] / 1e3:.0f}k/s, store alone {alones[-1] / 1e3:.0f}k/s, "
              f"ingest {fulls[-1]['rows_per_s'] / 1e3:.0f}k/s ({fulls[-1]['commits']} commits)")  # fmt: skip
    load_after = os.getloadavg()[0]
    raw, alone = statistics.median(raws), statistics.median(alones)
    ingest = statistics.median(f["rows_per_s"] for f in fulls)
    full = fulls[-1]
    problems = [p for f in fulls for p in f["problems"]]
    spread = lambda xs: f"{min(xs) / 1e3:,.0f}k-{max(xs) / 1e3:,.0f}k"  # noqa: E731
    print(f"raw ZeroMQ PUSH/PULL:        {raw / 1e3:9.0f}k transitions/s (median of {args.repeat})")
    print(f"store alone (1 process):     {alone / 1e3:9.0f}k transitions/s")
    print(f"ingest, committed + acked:   {ingest / 1e3:9.0f}k transitions/s")
    print(f"ratio ingest / raw ZeroMQ:   {ingest / raw:9.3f}")
    for name, results in codecs.items():
        print(f"  codec {name:30s} {statistics.median(r[0] for r in results) / 1e3:6.0f}k rows/s, "
              f"{results[-1][1]:.0f} MB on disk")  # fmt: skip
    print(f"load average: {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} cores)")
    print("integrity: " + ("OK (every row once, seqs complete, data equal)" if not problems else "FAILED"))
    for problem in problems:
        print("  " + problem)

    if not args.no_write and not problems:
        from benchmarks.report import machine_line, write_section

        ratio = codecs["none"][-1][1] / codecs[next(iter(CODECS))][-1][1]
        codec_rows = "\n".join(
            f"| {name} | {statistics.median(r[0] for r in results) / 1e3:,.0f}k | {results[-1][1]:.0f} MB |"
            for name, results in codecs.items()
        )
        write_section(
            "ingest",
            f"""## Ingest: actors -> ZeroMQ -> committed Zarr store

`{command}`: {args.senders} sender processes, {args.rows}-row chunks of {args.obs_dim}-dim obs /
{args.act_dim}-dim action transitions, {args.chunks} chunks each, window of {args.window} unacked chunks,
group commit at each full Zarr chunk ({full['chunk_rows']} rows){f" or {args.commit_rows} rows" if args.commit_rows else ""}
or {args.commit_interval * 1000:.0f} ms after the previous commit. Medians of {args.repeat} runs (min-max in brackets).
Machine: {machine_line()}; load average {load_before:.1f} before, {load_after:.1f} after (other jobs shared the machine).

| path | transitions/s |
|---|---|
| raw ZeroMQ PUSH/PULL loopback, same frames (anchor) | {raw / 1e3:,.0f}k ({spread(raws)}) |
| store alone: decode + append + commit, one process | {alone / 1e3:,.0f}k ({spread(alones)}) |
| **ingest: DEALER -> ROUTER -> validate -> Zarr commit -> ack** | **{ingest / 1e3:,.0f}k** ({spread([f["rows_per_s"] for f in fulls])}) |

Ratio ingest / raw ZeroMQ: {ingest / raw:.3f} (the transport is not the bottleneck: compression and chunk
writes are). Timed until every chunk was acked (= committed); {full['total']:,} rows per run,
{full['commits']} commits in the last run. Integrity checked after every run: row count, per-actor committed
seq, no duplicate / rejected / out-of-order chunk, first/middle/last chunk of each actor equal to what was
sent, MC returns present on every ended episode.

Codec (store alone, same data: {args.chunks * args.rows:,} rows, {full['raw_mb'] / args.senders:.0f} MB of raw columns,
random-walk observations; the default writes {ratio:.1f}x less than no compression):

| codec | rows/s | on disk |
|---|---|---|
{codec_rows}
""",
        )
        print("wrote the 'ingest' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
